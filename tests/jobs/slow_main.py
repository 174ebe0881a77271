"""``python -m tests.jobs.slow_main <cli args>``: the real CLI (``serve``, ``worker``) with each copied tensor taking
``ADAPTER_SURGERY_TEST_TENSOR_DELAY`` seconds, so that a test can kill the process mid-write. Test-only."""

from __future__ import annotations

import os
import sys
import time

from adapter_surgery.cli import main
from adapter_surgery.io import writer

_original = writer.CopiedTensor.write
_delay = float(os.environ.get("ADAPTER_SURGERY_TEST_TENSOR_DELAY", "0.1"))


def _slow_write(self: writer.CopiedTensor, fd: int) -> None:
    time.sleep(_delay)
    _original(self, fd)


writer.CopiedTensor.write = _slow_write  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
