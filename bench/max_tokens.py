"""The largest accepted extend-vocab request: 2^20 new tokens on the real SmolLM2, in-process (as the service runs it).

Issue 8 asks that it finishes in under a minute on the project's 2-core machine, or that the limit comes down.
Usage (run it under a memory cap)::

    PYTHONPATH=service ../shared/tools/capped 10 .venv/bin/python bench/max_tokens.py [N]

Prints the import time, the operation's wall and CPU seconds, the rows after, and the peak RSS.
"""

from __future__ import annotations

import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2**20
    started = time.perf_counter()
    from adapter_surgery.demo.checkpoints import fetch_smollm2
    from adapter_surgery.ops.common import RunContext
    from adapter_surgery.ops.extend_vocab import ExtendVocabSpec, extend_vocab

    src = fetch_smollm2()
    imports = time.perf_counter() - started
    data = Path(tempfile.mkdtemp(prefix="max-tokens-"))
    try:
        (data / "base").mkdir()
        for p in src.iterdir():
            os.link(p, data / "base" / p.name)
        spec = ExtendVocabSpec.model_validate({"checkpoint": "base", "output": "out", "device": "cpu",
                                               "tokens": [f"<tok_{i}>" for i in range(n)]})
        wall, cpu = time.perf_counter(), time.process_time()
        result = extend_vocab(spec, RunContext(data))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        shutil.rmtree(data, ignore_errors=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"tokens {n}  imports {imports:.1f} s  extend-vocab {wall:.1f} s wall, {cpu:.1f} s CPU  "
          f"rows {result.vocab_size_before} -> {result.vocab_size_after}  peak RSS {rss:.2f} GiB")


if __name__ == "__main__":
    main()
