"""One operation variant, warm and in-process, against the copy floor of what it wrote: per-rep ratios, medians.

``PYTHONPATH=service python bench/warm_floor.py 3b attach-head:seq-cls-3 --reps 7``

The quick check of issue 11's "warm service within 1.5x of the copy floor" without ``bench/run.py``'s fresh
processes and anchors: each rep flushes the page cache's dirty pages (``os.sync``, untimed), runs the variant as
``bench/warm_median.py`` does (one digest, architecture and tokenizer cache kept over the reps), then copies the
files it wrote (those that are not hard links of the input: ``run.changed_files``) with ``fsync``, exactly as
``run.floor`` does for the bench's ``floor`` column, after another ``os.sync``. Prints one JSON line: the op's wall
and CPU seconds, the floor's wall seconds and bytes, the per-rep ratio op/floor and their medians, and the load
average. On a shared machine, judge by the medians and the CPU seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import changed_files, floor
from warm_median import arguments, prepared


def main() -> None:
    args = arguments("attach-head:seq-cls-3")
    out = f"out-warm-floor-{os.getpid()}"
    variant, data, op, spec, context = prepared(args, out)
    base = data / "base"
    scratch = data / f"floor-scratch-{os.getpid()}"

    def once() -> tuple[float, float, float, int]:
        shutil.rmtree(data / out, ignore_errors=True)
        os.sync()
        c0, t0 = os.times(), time.perf_counter()
        op.run(spec, context())
        wall, c1 = time.perf_counter() - t0, os.times()
        os.sync()
        fl = floor(changed_files(data / out, base), scratch)
        return wall, (c1.user - c0.user) + (c1.system - c0.system), fl["wall"], fl["bytes"]

    try:
        once()  # warm: imports, first-touch of the page cache, caches
        runs = [once() for _ in range(args.reps)]
    finally:
        shutil.rmtree(data / out, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    walls, cpus, floors = [r[0] for r in runs], [r[1] for r in runs], [r[2] for r in runs]
    print(json.dumps({"size": args.size, "variant": variant.key, "device": args.device, "reps": args.reps,
                      "wall_median_s": round(statistics.median(walls), 3),
                      "cpu_median_s": round(statistics.median(cpus), 3),
                      "floor_median_s": round(statistics.median(floors), 3), "floor_gb": round(runs[0][3] / 1e9, 3),
                      "ratio_median": round(statistics.median(w / f for w, f in zip(walls, floors, strict=True)), 2),
                      "wall_s": [round(w, 3) for w in walls], "floor_s": [round(f, 3) for f in floors],
                      "loadavg": [round(x, 2) for x in os.getloadavg()]}))


if __name__ == "__main__":
    main()
