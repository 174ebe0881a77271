"""The warm side of the bench: one long-lived process that runs operations as the service does.

``python bench/warm.py DATA_DIR``: imports the service once, keeps one digest, architecture and tokenizer cache
(as one service instance does), then answers one JSON line per request line on stdin, ``{"op": name, "spec":
{...}}``: ``seconds`` of the call, ``maxrss`` (bytes: peak RSS during the call, VmHWM reset before it through
``/proc/self/clear_refs``), the process's I/O counters over the call (``/proc/self/io``: all threads, finished
ones included), CPU seconds, and ``error`` when the operation raised. The harness sends a first, untimed request
to warm it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from measure import IO_KEYS, proc_io


def _hwm() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_hwm() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:  # not permitted: the figure is then the process's peak so far
        pass


def main() -> None:
    data_dir = Path(sys.argv[1])
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # whatever an operation prints must not reach the harness
    from adapter_surgery.io.writer import DigestCache
    from adapter_surgery.model.roles import ArchitectureCache
    from adapter_surgery.ops import OPERATIONS
    from adapter_surgery.ops.common import RunContext
    from adapter_surgery.tokenizer_cache import TokenizerCache

    digests, architectures, tokenizers = DigestCache(), ArchitectureCache(), TokenizerCache()  # as the service
    answers.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        op = OPERATIONS[req["op"]]
        error = None
        _reset_hwm()
        io0, cpu0 = proc_io(), os.times()
        t0 = time.perf_counter()
        try:
            ctx = RunContext(data_dir, digests=digests, architectures=architectures, tokenizers=tokenizers)
            op.run(op.spec.model_validate(req["spec"]), ctx)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"[:2000]
        seconds = time.perf_counter() - t0
        io1, cpu1 = proc_io(), os.times()
        answers.write(json.dumps({"seconds": seconds, "maxrss": _hwm(), "error": error,
                                  "user": cpu1.user - cpu0.user, "sys": cpu1.system - cpu0.system,
                                  "io": {k: io1[k] - io0[k] for k in IO_KEYS}}) + "\n")


if __name__ == "__main__":
    main()
