"""Jobs: every operation runs as a job on a huey queue (SQLite embedded, Redis for many machines); no HTTP here."""

from adapter_surgery.jobs.models import FINISHED, Job, JobProgress, JobRecord, JobState
from adapter_surgery.jobs.service import JobService

__all__ = ["FINISHED", "Job", "JobProgress", "JobRecord", "JobService", "JobState"]
