"""Benchmark: attach-lora against peft on a synthetic ~1.1B Llama checkpoint, and header-only at 7B shape.

Every run is a fresh subprocess (so the peak RSS is that run's own):

- adapter-surgery: ``attach_lora`` (r=16, ``all-linear``), output written atomically;
- peft: ``AutoModelForCausalLM.from_pretrained`` (bf16, as stored), ``get_peft_model(LoraConfig(r=16,
  target_modules="all-linear"))``, ``save_pretrained``.

Checkpoints are built once under ``.cache/bench/``:

- ``attach-lora-1b``: TinyLlama-1.1B shapes (hidden 2048, 22 layers, 4 KV heads), random bf16, written group by
  group into ~500 MB shards (~2.2 GB);
- ``attach-lora-7b``: Llama-2-7B shapes (hidden 4096, 32 layers, vocab 32000; 13.5 GB in 3 shards), with real
  safetensors headers but **sparse** data regions (``truncate``): no byte is written, and data-free inits never
  read one. ``--peft-7b`` also runs peft on it (loads 13.5 GB of zeros; needs ~16 GB of RAM).

Usage: ``python bench/bench_attach_lora.py [--inits true,pissa_niter_4] [--peft-7b]``; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "bench"
SHAPES = {
    "1b": {"hidden": 2048, "inter": 5632, "layers": 22, "heads": 32, "kv": 4, "vocab": 32000},
    "7b": {"hidden": 4096, "inter": 11008, "layers": 32, "heads": 32, "kv": 32, "vocab": 32000},
}


def _config(dest: Path, s: dict) -> None:
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["inter"], num_hidden_layers=s["layers"],
                num_attention_heads=s["heads"], num_key_value_heads=s["kv"], vocab_size=s["vocab"],
                tie_word_embeddings=False, dtype="bfloat16").save_pretrained(dest)


def _groups(s: dict) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensor names and shapes in save order, one group per layer (embedding first, norm + head last)."""
    h, i, kv = s["hidden"], s["inter"], s["hidden"] // s["heads"] * s["kv"]
    groups = [[("model.embed_tokens.weight", (s["vocab"], h))]]
    for n in range(s["layers"]):
        p = f"model.layers.{n}."
        groups.append([(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                       (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                       (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                       (p + "mlp.down_proj.weight", (h, i)), (p + "input_layernorm.weight", (h,)),
                       (p + "post_attention_layernorm.weight", (h,))])
    groups.append([("model.norm.weight", (h,)), ("lm_head.weight", (s["vocab"], h))])
    return groups


def _pack(groups: list[list[tuple[str, tuple[int, ...]]]], shard_bytes: float) -> list[list[tuple[str, tuple]]]:
    shards: list[list[tuple[str, tuple]]] = [[]]
    for grp in groups:
        if shards[-1] and sum(math.prod(sh) * 2 for _, sh in shards[-1]) > shard_bytes:
            shards.append([])
        shards[-1].extend(grp)
    return shards


def _index(dest: Path, shards: list[list[tuple[str, tuple]]]) -> None:
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        weight_map.update(dict.fromkeys((n for n, _ in shard), name))
        total += sum(math.prod(sh) * 2 for _, sh in shard)
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=2))


def build_random(dest: Path, s: dict) -> Path:
    """Random bf16 weights (N(0, 0.02), norms 1), written shard by shard: memory stays at one shard (~500 MB)."""
    if (dest / "config.json").exists():
        return dest
    import torch
    from safetensors.torch import save_file

    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    shards = _pack(_groups(s), 500e6)
    for k, shard in enumerate(shards, 1):
        tensors = {n: (torch.randn(*sh, generator=g) * 0.02).bfloat16() if len(sh) == 2 else torch.ones(sh).bfloat16()
                   for n, sh in shard}
        save_file(tensors, str(tmp / f"model-{k:05d}-of-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
        del tensors
    _index(tmp, shards)
    _config(tmp, s)
    tmp.rename(dest)
    return dest


def build_sparse(dest: Path, s: dict) -> Path:
    """Header-correct safetensors shards whose data regions are holes (``truncate``): instant, no disk used."""
    if (dest / "config.json").exists():
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards = _pack(_groups(s), 4.5e9)
    for k, shard in enumerate(shards, 1):
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape in shard:
            n = math.prod(shape) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with (tmp / f"model-{k:05d}-of-{len(shards):05d}.safetensors").open("wb") as fh:
            fh.write(len(raw).to_bytes(8, "little") + raw)
            fh.truncate(8 + len(raw) + offset)
    _index(tmp, shards)
    _config(tmp, s)
    tmp.rename(dest)
    return dest


OURS = """
import json, resource, sys, time
t0 = time.perf_counter()
from pathlib import Path
import peft, transformers  # imported up front by both scripts: the service has them loaded
from adapter_surgery.ops.attach_lora import AttachLoraSpec, attach_lora
from adapter_surgery.ops.common import RunContext
data, init = Path(sys.argv[1]), sys.argv[2]
spec = AttachLoraSpec(checkpoint="base", output="out-ours", r=16, lora_alpha=32, target_modules="all-linear",
                      init_lora_weights=True if init == "true" else init, overwrite=True, device="cpu")
t1 = time.perf_counter()
r = attach_lora(spec, RunContext(data))
first = time.perf_counter() - t1
t2 = time.perf_counter()
if init == "true":  # a second request in the same process: what a running service sees
    attach_lora(spec, RunContext(data))
warm = time.perf_counter() - t2 if init == "true" else first
print(json.dumps({"seconds": time.perf_counter() - t0 - (warm if init == "true" else 0), "op_seconds": first,
                  "warm_seconds": warm, "bytes_read": r.base_bytes_read, "targets": len(r.target_modules),
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

PEFT = """
import json, resource, sys, time
t0 = time.perf_counter()
from pathlib import Path
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
data, init, dtype = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
t1 = time.perf_counter()
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(data / "base", **({} if dtype == "auto" else {"dtype": dtype}))
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM",
                                         init_lora_weights=True if init == "true" else init))
model.save_pretrained(data / "out-peft")
print(json.dumps({"seconds": time.perf_counter() - t0, "op_seconds": time.perf_counter() - t1,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(code: str, data: Path, init: str, dtype: str = "auto") -> dict:
    out = subprocess.run([sys.executable, "-c", code, str(data), init, dtype], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inits", default="true,pissa_niter_4", help="comma-separated init_lora_weights for 1B")
    parser.add_argument("--peft-7b", action="store_true", help="also run peft on the 7B-shaped (sparse) checkpoint")
    parser.add_argument("--repeat", type=int, default=3, help="runs of the data-free attach-lora (best is shown)")
    args = parser.parse_args()
    t = time.perf_counter()
    one = build_random(CACHE / "attach-lora-1b" / "base", SHAPES["1b"]).parent
    seven = build_sparse(CACHE / "attach-lora-7b" / "base", SHAPES["7b"]).parent
    print(f"checkpoints ready in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    rows = []
    fp32 = None
    for label, data, inits, with_peft in [("1.1B", one, args.inits.split(","), True),
                                          ("7B (sparse)", seven, ["true"], args.peft_7b)]:
        size = sum(p.stat().st_size for p in (data / "base").glob("*.safetensors"))
        for init in inits:
            repeat = args.repeat if init == "true" else 1
            ours = min((run(OURS, data, init) for _ in range(repeat)), key=lambda r: r["op_seconds"])
            theirs = run(PEFT, data, init) if with_peft else None
            rows.append((label, size, init, ours, theirs))
            print(label, init, ours, theirs, file=sys.stderr)
            if label == "1.1B" and init == "true":  # transformers 4's default: load in float32, every byte read
                fp32 = (ours, run(PEFT, data, init, "float32"))
        for name in ("out-ours", "out-peft"):
            shutil.rmtree(data / name, ignore_errors=True)
    print("| checkpoint | init | attach-lora op s (first / warm) | attach-lora process s | RSS MB | base bytes read | "
          "peft load+get_peft_model+save s | peft process s | peft RSS MB | speed-up (op) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, size, init, ours, theirs in rows:
        p = ("| - | - | - | - |" if theirs is None else
             f"| {theirs['op_seconds']:.2f} | {theirs['seconds']:.2f} | {theirs['rss_mb']:.0f} | "
             f"{theirs['op_seconds'] / ours['op_seconds']:.0f}x |")
        print(f"| {label}, {size / 1e9:.1f} GB bf16, {ours['targets']} targets | {init} | "
              f"{ours['op_seconds']:.2f} / {ours['warm_seconds']:.2f} | "
              f"{ours['seconds']:.2f} | {ours['rss_mb']:.0f} | {ours['bytes_read']:,} " + p)
    if fp32 is not None:
        ours, theirs = fp32
        print(f"\npeft with the base loaded in float32 (transformers 4's default; every weight read and converted), "
              f"1.1B, init true: {theirs['op_seconds']:.2f} s, process {theirs['seconds']:.2f} s, RSS "
              f"{theirs['rss_mb']:.0f} MB: {theirs['op_seconds'] / ours['op_seconds']:.0f}x the attach-lora op.")


if __name__ == "__main__":
    main()
