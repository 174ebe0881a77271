"""Service settings, read from ``ADAPTER_SURGERY_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Settings of the HTTP service and the CLI.

    - ``data_dir`` (``ADAPTER_SURGERY_DATA_DIR``, default ``./data``): every ``checkpoint``/``output`` path in a
      request is resolved under it; paths that escape it are refused.
    - ``max_upload_bytes`` (``ADAPTER_SURGERY_MAX_UPLOAD_BYTES``, default 2 GiB): the upload form's size limit,
      archive contents included.
    - ``device`` (``ADAPTER_SURGERY_DEVICE``): the default for requests that say ``"auto"``.

    Jobs (every operation runs as a job on a huey queue; see the README's "Jobs"):

    - ``workers`` (``ADAPTER_SURGERY_WORKERS``, default 2, 1..64): jobs run at once per process (the API's
      embedded workers, or each ``adapter-surgery worker``).
    - ``max_queue`` (``ADAPTER_SURGERY_MAX_QUEUE``, default 64): queued jobs before a submission answers 429.
    - ``queue_url`` (``ADAPTER_SURGERY_QUEUE_URL``, default none): ``redis://host:port/db`` to share the queue and
      the job records between machines (the API only enqueues; ``adapter-surgery worker`` runs them). Without it
      the queue is a SQLite file in ``<data_dir>/.adapter-surgery/`` and the API process runs the jobs.
    - ``job_retention`` (``ADAPTER_SURGERY_JOB_RETENTION``, default 1000): finished job records kept.
    - ``heartbeat_seconds`` (``ADAPTER_SURGERY_HEARTBEAT_SECONDS``, default 5): how often a running job's record
      is refreshed; a job whose worker is gone (same host: its process; another host: no heartbeat for 4
      intervals) is marked failed and its temporary files removed.
    """

    model_config = SettingsConfigDict(env_prefix="ADAPTER_SURGERY_")

    data_dir: Path = Path("./data")
    max_upload_bytes: int = Field(default=2 * 1024**3, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    workers: int = Field(default=2, ge=1, le=64)
    max_queue: int = Field(default=64, ge=1, le=100_000)
    queue_url: str | None = Field(default=None, pattern=r"^rediss?://")
    job_retention: int = Field(default=1000, ge=10, le=1_000_000)
    heartbeat_seconds: float = Field(default=5.0, gt=0, le=300)
