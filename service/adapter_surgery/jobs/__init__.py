"""Jobs: every operation runs as a job on a huey queue (SQLite embedded, Redis for many machines); no HTTP here.

The names below are imported on first use (PEP 562), so that ``adapter_surgery.jobs.runner`` (what the CLI runs an
operation with) does not import the queue (huey, redis, the job store) that a CLI run does not use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adapter_surgery.jobs.models import FINISHED, Job, JobProgress, JobRecord, JobState
    from adapter_surgery.jobs.service import JobService

__all__ = ["FINISHED", "Job", "JobProgress", "JobRecord", "JobService", "JobState"]
_WHERE = {"FINISHED": "models", "Job": "models", "JobProgress": "models", "JobRecord": "models",
          "JobState": "models", "JobService": "service"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
