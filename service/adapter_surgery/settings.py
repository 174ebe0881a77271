"""Service settings, read from ``ADAPTER_SURGERY_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Settings of the HTTP service and the CLI.

    - ``data_dir`` (``ADAPTER_SURGERY_DATA_DIR``, default ``./data``): every ``checkpoint``/``output`` path in a
      request is resolved under it; paths that escape it are refused.
    - ``max_upload_bytes`` (``ADAPTER_SURGERY_MAX_UPLOAD_BYTES``, default 2 GiB): the upload form's size limit,
      archive contents included.
    - ``device`` (``ADAPTER_SURGERY_DEVICE``): the default for requests that say ``"auto"``.
    - ``api_token`` (``ADAPTER_SURGERY_API_TOKEN``) or ``api_token_file`` (``ADAPTER_SURGERY_API_TOKEN_FILE``, a
      mounted secret; a trailing newline is stripped): when set, every route but ``/healthz`` and ``/readyz``
      requires ``Authorization: Bearer <token>``. Unset: no authentication.
    - ``max_json_bytes`` (``ADAPTER_SURGERY_MAX_JSON_BYTES``, default 16 MiB): the JSON body's size limit (413).
    - ``max_archive_members`` (``ADAPTER_SURGERY_MAX_ARCHIVE_MEMBERS``, default 10000): members of an uploaded
      archive at most (413).
    - ``log_json`` (``ADAPTER_SURGERY_LOG_JSON``, default true): ``serve`` logs one JSON object per line; false:
      plain text.
    - ``memory_limit_bytes`` (``ADAPTER_SURGERY_MEMORY_LIMIT_BYTES``, default unset): the memory one job may use;
      unset, the memory available to the process (cgroup limit less usage, or ``MemAvailable``). A job whose
      estimate exceeds it is refused with 503 before any work.
    - ``warm_imports`` (``ADAPTER_SURGERY_WARM_IMPORTS``, default true): at start-up, a background thread imports
      the ``transformers``/``peft`` modules the operations use (2.5-3 s), so that no request pays for them.

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
    api_token: SecretStr | None = None
    api_token_file: Path | None = None
    max_json_bytes: int = Field(default=16 * 1024**2, gt=0)
    max_archive_members: int = Field(default=10_000, gt=0)
    log_json: bool = True
    memory_limit_bytes: int | None = Field(default=None, ge=0)
    warm_imports: bool = True
    workers: int = Field(default=2, ge=1, le=64)
    max_queue: int = Field(default=64, ge=1, le=100_000)
    queue_url: str | None = Field(default=None, pattern=r"^rediss?://")
    job_retention: int = Field(default=1000, ge=10, le=1_000_000)
    heartbeat_seconds: float = Field(default=5.0, gt=0, le=300)
