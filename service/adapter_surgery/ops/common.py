"""Pieces every operation shares: the path fields of a spec, result parts, run context."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from adapter_surgery.io.writer import DigestCache, WrittenFile

Progress = Callable[[str], None]


#: A request seed: any value ``torch.manual_seed`` and ``torch.Generator.manual_seed`` accept.
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]


class StrictModel(BaseModel):
    """A request model that refuses unknown fields (a typo gets a 422 naming it instead of being ignored) and
    NaN/Infinity in float fields."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class PathFields(StrictModel):
    """Where to read and write, relative to the data directory."""

    checkpoint: str = Field(description="Model directory or .safetensors file, relative to the data directory.")
    output: str = Field(description="Output directory (or .safetensors file for a bare-file checkpoint), relative "
                                    "to the data directory; built beside it and renamed into place.")
    overwrite: bool = Field(
        False, description="Replace an existing output (atomically, after the new one is complete)."
    )


class FileInfo(BaseModel):
    path: str = Field(description="Relative to the output.")
    bytes: int
    sha256: str

    @classmethod
    def of(cls, f: WrittenFile) -> FileInfo:
        return cls(path=f.path, bytes=f.bytes, sha256=f.sha256)


class ChangedTensor(BaseModel):
    name: str
    shape_before: list[int] | None = Field(description="None for a tensor the output adds.")
    shape: list[int]


@dataclass(frozen=True)
class RunContext:
    """How an operation is run: the data directory that request paths resolve under, a progress callback, and
    (in the service) a cache of unchanged files' sha256."""

    data_dir: Path
    progress: Progress | None = None
    digests: DigestCache | None = None

    def say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)
