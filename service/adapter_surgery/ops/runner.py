"""The opening and closing steps every operation shares, done once here.

An operation function starts with :func:`begin` (or :func:`begin_output` when its inputs are not one checkpoint):
its request paths resolved under the data directory (``NotFound``, ``PathOutsideDataDir``), the output checked
against the input (``OutputExists``, an output inside its input), and the clock started. The :class:`Run` it gets
back opens the checkpoint and resolves its architecture (with the service's cache), writes the output atomically
(built beside it, renamed into place, owned by the job) and gives the elapsed seconds for the result.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapter_surgery.errors import SurgeryError
from adapter_surgery.io import Checkpoint, atomic_output
from adapter_surgery.io.atomic import check_output_path
from adapter_surgery.model.roles import Architecture, resolve_architecture, resolve_with_model
from adapter_surgery.ops.common import PathFields, RunContext
from adapter_surgery.paths import resolve_under

if TYPE_CHECKING:
    from torch import nn

    from adapter_surgery.report import PreservationReport


@dataclass(frozen=True)
class Run:
    """One run of an operation: its context, resolved paths and start time.

    ``checkpoint``: the resolved input checkpoint (None for operations whose inputs are adapters); ``output``: the
    resolved output, already checked against the inputs.
    """

    ctx: RunContext
    checkpoint: Path | None
    output: Path
    overwrite: bool
    started: float

    def open(self) -> Checkpoint:
        """The input checkpoint, opened (headers validated; ``InvalidCheckpoint`` otherwise)."""
        assert self.checkpoint is not None, "this run has no checkpoint input"
        return Checkpoint.open(self.checkpoint)

    def architecture(self, ckpt: Checkpoint) -> Architecture:
        """``ckpt``'s tensor roles, from the service's cache when it has one."""
        return resolve_architecture(ckpt, self.ctx.architectures)

    def architecture_and_model(self, ckpt: Checkpoint) -> tuple[Architecture, nn.Module | None]:
        """:meth:`architecture`, and the meta-device model resolving it built (None on a cache hit): an operation
        that needs the model too builds it only when this gives None (:func:`roles.resolve_with_model`)."""
        return resolve_with_model(ckpt, self.ctx.architectures)

    def writing(self) -> AbstractContextManager[Path]:
        """The temporary output path to fill; renamed onto ``output`` when the block ends without an error."""
        return atomic_output(self.output, self.overwrite, owner=self.ctx.owner)

    def verify(self, written: Path, **options: Any) -> PreservationReport:
        """The preservation report (``report.preservation_report``, ``options`` passed on) of ``written``, the
        finished temporary output of :meth:`writing`, against the input checkpoint: run inside the ``writing`` block,
        before the output is published, so that a cancel during verify (polled between the report's steps and
        probes) leaves nothing at the output, and an output ``overwrite`` would replace is kept. Its messages name
        the output, not the temporary path."""
        from adapter_surgery.report import preservation_report

        assert self.checkpoint is not None, "this run has no checkpoint input"
        return preservation_report(self.checkpoint, written, progress=self.ctx.say, check=self.ctx.check_cancelled,
                                   patched_name=self.output.name, **options)

    def seconds(self) -> float:
        """Seconds since :func:`begin`, as results report them."""
        return round(time.perf_counter() - self.started, 4)


def begin(spec: PathFields, ctx: RunContext) -> Run:
    """Start an operation on ``spec.checkpoint`` that writes ``spec.output``."""
    started = time.perf_counter()
    checkpoint = resolve_under(ctx.data_dir, spec.checkpoint, "checkpoint")
    output = resolve_under(ctx.data_dir, spec.output, "output")
    check_output_path(output, checkpoint, spec.overwrite)
    return Run(ctx, checkpoint, output, spec.overwrite, started)


def begin_output(ctx: RunContext, output: str, overwrite: bool, inputs: Iterable[Path],
                 started: float | None = None) -> Run:
    """Start an operation whose inputs (already resolved and opened: adapter directories) are not one checkpoint;
    ``started``: when it started (default: now)."""
    started = time.perf_counter() if started is None else started
    resolved = resolve_under(ctx.data_dir, output, "output")
    for path in inputs:
        check_output_path(resolved, path, overwrite)
    return Run(ctx, None, resolved, overwrite, started)


def open_input(ctx: RunContext, value: str, field: str) -> tuple[Path, Checkpoint]:
    """A read-only input checkpoint named by request field ``field``: resolved and opened; its problems name
    ``field``."""
    path = resolve_under(ctx.data_dir, value, field)
    try:
        return path, Checkpoint.open(path)
    except SurgeryError as exc:
        if field != "checkpoint":
            exc.field = field
        raise
