"""Pieces every operation shares: the path fields of a spec, result parts, run context."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from adapter_surgery.errors import Cancelled
from adapter_surgery.io.writer import DigestCache, WrittenFile
from adapter_surgery.spec import PathFields, Seed, StrictModel  # noqa: F401 (re-exported: the shared spec types)

if TYPE_CHECKING:
    from adapter_surgery.model.roles import ArchitectureCache
    from adapter_surgery.tokenizer_cache import TokenizerCache


class FileInfo(BaseModel):
    path: str = Field(description="Relative to the output.")
    bytes: int
    sha256: str | None = Field(description="Hex digest. Every file the operation wrote has one; a linked file "
                                           "(`linked`) has one only when the service already knew it (e.g. from an "
                                           "earlier request), else null: its bytes are not read again.")
    linked: bool = Field(False, description="A hard link (or byte copy) of the input's file of the same name: "
                                            "its bytes, unchanged.")

    @classmethod
    def of(cls, f: WrittenFile) -> FileInfo:
        return cls(path=f.path, bytes=f.bytes, sha256=f.sha256, linked=f.linked)


class ChangedTensor(BaseModel):
    name: str
    shape_before: list[int] | None = Field(description="None for a tensor the output adds.")
    shape: list[int]


@dataclass(frozen=True)
class ProgressEvent:
    """What a progress callback receives: the stage, and the units done and planned in the whole job.

    ``done`` never decreases; ``total >= done`` and grows when more work is planned (each write plans its bytes
    when it starts). ``fraction`` is ``done / total`` (0 while nothing is planned).
    """

    stage: str
    done: int
    total: int
    unit: str  # "bytes" | "tensors" | "steps"

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total > 0 else 0.0


Progress = Callable[[ProgressEvent], None]


class _Tally:
    """The job-wide counters behind a run context (shared by the steps of a surgery, which pass it on)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = 0
        self.total = 0
        self.unit = "bytes"


@dataclass(frozen=True)
class RunContext:
    """How an operation is run.

    Attributes:
        data_dir: the directory that request paths resolve under.
        progress: receives a :class:`ProgressEvent` at each stage and after each tensor written.
        digests: (in the service) a cache of unchanged files' sha256.
        architectures: (in the service) a cache of resolved architectures (``arch.ArchitectureCache``).
        tokenizers: (in the service) a cache of loaded tokenizers (``tokenizer_cache.TokenizerCache``).
        should_cancel: polled at tensor and shard boundaries (:meth:`check_cancelled`).
        owner: the job id, written into the owner record of every temporary path (see ``io.atomic``).
        memory_limit_bytes: the service's ``memory_limit_bytes`` setting (None: the environment's, else what the
            process may still allocate; see :mod:`adapter_surgery.resources`).
    """

    data_dir: Path
    progress: Progress | None = None
    digests: DigestCache | None = None
    should_cancel: Callable[[], bool] | None = None
    owner: str | None = None
    memory_limit_bytes: int | None = None
    architectures: ArchitectureCache | None = None
    tokenizers: TokenizerCache | None = None
    _tally: _Tally = field(default_factory=_Tally, repr=False, compare=False)

    def _emit(self, stage: str) -> None:
        if self.progress is not None:
            t = self._tally
            self.progress(ProgressEvent(stage, t.done, max(t.total, t.done), t.unit))

    def say(self, stage: str) -> None:
        """A new stage, with no new numbers."""
        self._emit(stage)

    def advance(self, stage: str, done: int, total: int, unit: str = "bytes") -> None:
        """Set the job-wide numbers (``done`` is kept monotonic)."""
        with self._tally.lock:
            self._tally.done = max(self._tally.done, done)
            self._tally.total = max(total, self._tally.done)
            self._tally.unit = unit
        self._emit(stage)

    def plan(self, stage: str, units: int, unit: str = "bytes") -> None:
        """``units`` more work planned (the total grows)."""
        with self._tally.lock:
            self._tally.total += units
            self._tally.unit = unit
        self._emit(stage)

    def add_done(self, stage: str, units: int, unit: str = "bytes") -> None:
        """``units`` more work done."""
        with self._tally.lock:
            self._tally.done += units
            self._tally.unit = unit
        self._emit(stage)

    def check_cancelled(self) -> None:
        """Raise :class:`Cancelled` when the job was asked to stop."""
        if self.should_cancel is not None and self.should_cancel():
            raise Cancelled("the job was cancelled; nothing was written to the output",
                            fix="Submit the request again to run it.")
