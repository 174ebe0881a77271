"""Run one command as this process's only child and print what it cost, as one JSON line on stdout.

``python bench/measure.py STDOUT STDERR CMD...``: the child's output goes to the two files. Reported: ``wall``
(seconds, spawn to exit), ``user``/``sys`` CPU seconds and ``maxrss`` (bytes; the peak RSS of the child and of its
own children, ``getrusage(RUSAGE_CHILDREN)``), and the child's ``/proc`` I/O counters (``rchar``/``wchar``: bytes
through read/write-like system calls, page-cache hits included, mmap access not; ``read_bytes``/``write_bytes``:
bytes fetched from / sent to the storage layer). The kernel adds a reaped child's counters to its parent's, so the
difference of this process's ``/proc/self/io`` around the wait is the child's, taken after it has exited.
A separate wrapper process is needed because ``ru_maxrss`` of ``RUSAGE_CHILDREN`` is a maximum over all children.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

IO_KEYS = ("rchar", "wchar", "read_bytes", "write_bytes")


def proc_io(pid: str = "self") -> dict[str, int]:
    with open(f"/proc/{pid}/io") as fh:
        pairs = (line.split(":") for line in fh if ":" in line)
        return {k.strip(): int(v) for k, v in pairs if k.strip() in IO_KEYS}


def main() -> None:
    out, err, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
    with open(out, "wb") as so, open(err, "wb") as se:
        before = proc_io()
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, stdout=so, stderr=se)
        wall = time.perf_counter() - t0
        after = proc_io()
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"rc": rc, "wall": wall, "user": ru.ru_utime, "sys": ru.ru_stime, "maxrss": ru.ru_maxrss * 1024,
                      "io": {k: after[k] - before[k] for k in IO_KEYS}}))


if __name__ == "__main__":
    main()
