"""The job as the API shows it."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


#: States a job never leaves.
FINISHED = frozenset({JobState.succeeded, JobState.failed, JobState.cancelled})


class JobProgress(BaseModel):
    fraction: float = Field(0.0, ge=0, le=1, description="done / total (0 while nothing is planned).")
    stage: str = Field("", description='What the job does now, e.g. "rewriting shard 2/4".')
    done: int = Field(0, ge=0, description="Units done in the whole job.")
    total: int = Field(0, ge=0, description="Units planned for the whole job (grows when a write plans more).")
    unit: str = Field("bytes", description='"bytes", "tensors", "steps", or "tokens" (extend-vocab planning its '
                                           'tokens, before its writes).')


class Job(BaseModel):
    id: str
    operation: str
    state: JobState
    progress: JobProgress = Field(default_factory=JobProgress)
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: dict[str, Any] | None = Field(None, description="The operation's result (as its synchronous answer).")
    problem: dict[str, Any] | None = Field(None, description="The problem+json the synchronous call would have "
                                                            "answered.")
    worker: str | None = Field(None, description="host:pid of the process that ran the job.")
    cancel_requested: bool = False


class JobRecord(BaseModel):
    """What the store keeps: the job, the request, and the bookkeeping of the process that runs it."""

    job: Job
    spec: dict[str, Any] = Field(default_factory=dict)
    data_dir_rel: str = ""
    task_id: str | None = None
    host: str | None = None
    pid: int | None = None
    pid_start: int | None = None
    heartbeat: float | None = None  # time.time() of the last heartbeat
    bytes_read: int = 0  # recorded when the job finishes (for /metrics)
    bytes_written: int = 0
