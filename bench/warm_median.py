"""One operation variant, warm and in-process, as the service runs it: the median of N timed runs.

``PYTHONPATH=service python bench/warm_median.py 0.13b extend-vocab:mean --reps 7 [--device cpu] [--profile]``

Imports the service once, keeps one digest, architecture and tokenizer cache (as the service does), runs the variant's
spec (``bench/workloads.py``) on the cached checkpoint of that size (``bench/checkpoints.py`` builds it) once
untimed, then ``--reps`` times, removing the output between runs, and prints one JSON line: wall and CPU (user +
system, every thread) seconds per run and their medians, and the load average. ``--profile`` prints a cProfile of
one more run instead (cumulative, then own time). The quick loop for a change; ``bench/run.py`` is the side-by-side
verdict (anchors, floor, fresh processes).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from checkpoints import build
from workloads import select


def arguments(example: str, profile: bool = False) -> argparse.Namespace:
    """The command line both warm scripts take: size, op:variant, --reps, --device (and --profile here)."""
    ap = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__.split("\n")[0])
    ap.add_argument("size")
    ap.add_argument("variant", help=f"op:variant of bench/workloads.py, e.g. {example}")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    if profile:
        ap.add_argument("--profile", action="store_true")
    return ap.parse_args()


def prepared(args: argparse.Namespace, out: str) -> tuple[Any, Path, Any, Any, Callable[[], Any]]:
    """The variant, its checkpoint's data directory, the operation, its spec writing to ``out``, and a factory of
    run contexts that share one digest, architecture and tokenizer cache (as the service keeps them)."""
    (variant,) = select(args.variant)
    data = build(args.size).parent

    from adapter_surgery.io.writer import DigestCache
    from adapter_surgery.model.roles import ArchitectureCache
    from adapter_surgery.ops import OPERATIONS
    from adapter_surgery.ops.common import RunContext
    from adapter_surgery.tokenizer_cache import TokenizerCache

    op = OPERATIONS[variant.op]
    spec = op.spec.model_validate(variant.spec(out, args.device))
    caches = {"digests": DigestCache(), "architectures": ArchitectureCache(), "tokenizers": TokenizerCache()}
    return variant, data, op, spec, lambda: RunContext(data, **caches)


def main() -> None:
    args = arguments("extend-vocab:hewitt", profile=True)
    out = f"out-warm-median-{os.getpid()}"
    variant, data, op, spec, context = prepared(args, out)

    def once() -> tuple[float, float]:
        shutil.rmtree(data / out, ignore_errors=True)
        ctx = context()
        c0, t0 = os.times(), time.perf_counter()
        op.run(spec, ctx)
        wall, c1 = time.perf_counter() - t0, os.times()
        return wall, (c1.user - c0.user) + (c1.system - c0.system)

    try:
        once()  # warm: imports, first-touch of the page cache, caches
        if args.profile:
            shutil.rmtree(data / out, ignore_errors=True)
            prof = cProfile.Profile()
            prof.enable()
            op.run(spec, context())
            prof.disable()
            stats = pstats.Stats(prof)
            stats.sort_stats("cumulative").print_stats(40)
            stats.sort_stats("tottime").print_stats(25)
            return
        runs = [once() for _ in range(args.reps)]
    finally:
        shutil.rmtree(data / out, ignore_errors=True)
    walls, cpus = [w for w, _ in runs], [c for _, c in runs]
    print(json.dumps({"size": args.size, "variant": variant.key, "device": args.device, "reps": args.reps,
                      "wall_median_s": round(statistics.median(walls), 3),
                      "cpu_median_s": round(statistics.median(cpus), 3),
                      "wall_s": [round(w, 3) for w in walls], "cpu_s": [round(c, 3) for c in cpus],
                      "loadavg": [round(x, 2) for x in os.getloadavg()]}))


if __name__ == "__main__":
    main()
