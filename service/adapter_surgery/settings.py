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
    - ``memory_limit_bytes`` (``ADAPTER_SURGERY_MEMORY_LIMIT_BYTES``, default unset): the memory one job may use;
      unset, the memory available to the process (cgroup limit less usage, or ``MemAvailable``). A job whose
      estimate exceeds it is refused with 503 before any work.
    """

    model_config = SettingsConfigDict(env_prefix="ADAPTER_SURGERY_")

    data_dir: Path = Path("./data")
    max_upload_bytes: int = Field(default=2 * 1024**3, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    memory_limit_bytes: int | None = Field(default=None, ge=0)
