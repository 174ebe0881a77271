#!/usr/bin/env bash
# The GPU checks of issue 11, on a machine with CUDA (CI has none and skips them): the `gpu` tests (device "cuda"
# against the CPU path), then hewitt (extend-vocab, 8 tokens) and PiSSA (attach-lora pissa_niter_4, r=16,
# all-linear) on the 1B bench checkpoint, warm and in-process, on the GPU and on the CPU. Figures go to
# ${GPU_RESULTS:-bench/gpu-results.md} (and the raw JSON lines beside it). Budget: under 5 minutes on one GPU with
# 16 cores, the 1B checkpoint built on first use (~2.2 GB, about a minute) and cached under .cache/bench/1b.
#
#   PYTHON=.venv/bin/python bench/gpu.sh      # needs a CUDA build of torch in that environment
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${GPU_RESULTS:-bench/gpu-results.md}
RAW=${OUT%.md}.jsonl
export PYTHONPATH=service
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: nothing to run")'
start=$(date +%s)

echo "== gpu tests" >&2
tests_rc=0
timeout 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee /tmp/gpu-tests.log || tests_rc=$?

echo "== 1B checkpoint" >&2
"$PY" bench/checkpoints.py 1b >&2
: > "$RAW"
run() {  # variant device reps
    timeout 120 "$PY" bench/warm_median.py 1b "$1" --device "$2" --reps "$3" >> "$RAW" \
        || echo "{\"variant\": \"$1\", \"device\": \"$2\", \"error\": \"exit $?\"}" >> "$RAW"
}
run extend-vocab:hewitt cuda 3
run extend-vocab:hewitt cpu 3
run attach-lora:pissa_niter_4 cuda 2
run attach-lora:pissa_niter_4 cpu 1

"$PY" - "$RAW" "$OUT" "$tests_rc" "$(( $(date +%s) - start ))" <<'PY'
import json, platform, sys, torch
raw, out, rc, secs = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
rows = [json.loads(line) for line in open(raw) if line.strip()]
lines = ["# GPU figures (bench/gpu.sh)", "",
         f"- Machine: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
         f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads; run {secs} s.",
         f"- `gpu` tests: {'passed' if rc == 0 else f'FAILED (exit {rc}; see the log)'}.",
         "- 1B checkpoint (TinyLlama shapes, bf16), warm in-process medians (bench/warm_median.py).", "",
         "| variant | device | reps | wall median s | CPU median s |", "|---|---|---|---|---|"]
for r in rows:
    lines.append(f"| {r['variant']} | {r['device']} | {r.get('reps', '-')} | {r.get('wall_median_s', r.get('error'))} "
                 f"| {r.get('cpu_median_s', '-')} |")
by = {(r["variant"], r["device"]): r.get("wall_median_s") for r in rows}
for v in ("extend-vocab:hewitt", "attach-lora:pissa_niter_4"):
    g, c = by.get((v, "cuda")), by.get((v, "cpu"))
    if g and c:
        lines.append(f"\n{v}: CPU/GPU {c / g:.2f}x")
open(out, "w").write("\n".join(lines) + "\n")
print(open(out).read())
PY
exit "$tests_rc"
