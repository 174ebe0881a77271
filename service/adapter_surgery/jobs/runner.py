"""Run one operation the same way everywhere (job worker, CLI): a full disk becomes a ``DiskFull`` problem, and a
problem names paths relative to the data directory (the core names them in full)."""

from __future__ import annotations

import errno

from pydantic import BaseModel

from adapter_surgery.errors import DiskFull, SurgeryError
from adapter_surgery.ops import Operation
from adapter_surgery.ops.common import PathFields, RunContext
from adapter_surgery.paths import without_dirs

#: ``OSError`` numbers that mean "no room for the output": no space, over quota, over the file-size limit.
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def run_operation(op: Operation, spec: PathFields, ctx: RunContext) -> BaseModel:
    """``op.run(spec, ctx)``; an ``OSError`` of :data:`DISK_FULL` becomes :class:`DiskFull` naming the output (the
    operation's ``atomic_output`` has already removed what it wrote)."""
    try:
        return op.run(spec, ctx)
    except SurgeryError as exc:  # paths the core names in full, relative to the data directory as requested
        fix = None if exc.fix is None else without_dirs(exc.fix, ctx.data_dir)
        exc.reword(without_dirs(exc.detail, ctx.data_dir), fix=fix)
        raise
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        output = getattr(spec, "output", None) or "the output"
        raise DiskFull(f"no room to write {output!r} ({exc.strerror or exc}); nothing was left at the output",
                       field="output" if hasattr(spec, "output") else None,
                       fix="Free space (or raise the quota) on the data directory's volume, then send the request "
                           "again.") from None
