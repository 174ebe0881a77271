"""What the bench runs: each operation variant as our spec, the anchor that does the same with transformers/peft,
and what each needs (memory, real weights), so that a run can say why it skips a pair instead of failing."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from anchors import ADAPTER, LORA, NEW_TOKENS, NUM_BLOCKS, NUM_LABELS, PISSA_ADAPTER, TRAINED_ADAPTER

#: The checkpoint (relative to a size's data directory) that verify compares with ``base``.
PATCHED = "patched-ev"


@dataclass(frozen=True)
class Variant:
    op: str  # the CLI command / service operation
    name: str
    spec: Callable[[str, str], dict]  # (output, device) -> our spec
    anchor: str  # bench/anchors.py NAME
    anchor_memory: float  # the anchor's peak RSS, in multiples of the bf16 model's bytes (measured at 1-3B, rounded up:
    # extend-vocab 1.12x and attach-head 1.02x at 3B, so 1.2 and 1.1 let their anchors run at the 7B shape in 20 GiB)
    ours_memory: float = 0.0  # ours, when it holds the model (verify loads it in float32)
    reads_weights: bool = False  # reads tensor data beyond the embedding/head rows (meaningless on sparse shards)
    note: str = ""
    #: An input made once per size before the pair runs: (operation, its spec (device) -> dict, its output dir).
    prepare: tuple[str, Callable[[str], dict], str] | None = None
    #: Run after ``prepare`` (and when its output is already there), on the size's data directory.
    after_prepare: Callable[[Path], None] | None = None

    @property
    def key(self) -> str:
        return f"{self.op}:{self.name}"


def _ev(init: str) -> Callable[[str, str], dict]:
    return lambda out, dev: {"checkpoint": "base", "output": out, "tokens": NEW_TOKENS, "init": init, "device": dev}


def _lora(**extra: object) -> Callable[[str, str], dict]:
    return lambda out, dev: {"checkpoint": "base", "output": out, **LORA, **extra, "device": dev}


def _prepare_patched(dev: str) -> dict:
    return {"checkpoint": "base", "output": PATCHED, "tokens": NEW_TOKENS, "init": "mean", "device": dev}


def _prepare_adapter(dev: str) -> dict:
    return {"checkpoint": "base", "output": ADAPTER, **LORA, "device": dev}


def _prepare_pissa(dev: str) -> dict:
    return {"checkpoint": "base", "output": PISSA_ADAPTER, **LORA, "init_lora_weights": "pissa_niter_4", "device": dev}


def _convert(out: str, dev: str) -> dict:
    return {"adapter": TRAINED_ADAPTER, "initial_adapter": PISSA_ADAPTER, "output": out, "base": "base"}


def _copy_trained(data: Path) -> None:
    """The "trained" adapter convert-adapter takes: a copy of the prepared PiSSA adapter's two files (the cost of
    the conversion does not depend on the values; the service refuses the same directory twice)."""
    (data / TRAINED_ADAPTER).mkdir(exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(data / PISSA_ADAPTER / name, data / TRAINED_ADAPTER / name)


def _surgery(out: str, dev: str) -> dict:
    return {"checkpoint": "base", "output": out, "steps": [
        {"op": "extend-vocab", "tokens": NEW_TOKENS, "init": "mean", "device": dev},
        {"op": "attach-head", "num_labels": NUM_LABELS, "device": dev},
        {"op": "attach-lora", **LORA, "device": dev}]}


VARIANTS: list[Variant] = [
    Variant("extend-vocab", "mean", _ev("mean"), "extend-vocab", 1.2, note="8 tokens"),
    Variant("extend-vocab", "hewitt", _ev("hewitt"), "extend-vocab", 1.2,
            note="8 tokens; the anchor is the same (transformers' mean_resizing samples from the rows' mean and "
                 "covariance, Hewitt's method)"),
    Variant("attach-lora", "default", _lora(), "attach-lora:default", 0.3, note="r=16, all-linear, data-free"),
    Variant("attach-lora", "pissa_niter_4", _lora(init_lora_weights="pissa_niter_4"), "attach-lora:pissa_niter_4",
            2.2, reads_weights=True, note="ours also writes the residual base; peft only mutates it in memory"),
    Variant("attach-lora", "pissa_niter_4+residual", _lora(init_lora_weights="pissa_niter_4"),
            "attach-lora:pissa_niter_4+residual", 2.2, reads_weights=True,
            note="the same request; the anchor also writes the residual base (unload + save_pretrained), as peft's "
                 "PiSSA guide does to train the adapter later, and as ours does"),
    Variant("attach-lora", "dora", _lora(use_dora=True), "attach-lora:dora", 1.4, reads_weights=True),
    Variant("attach-head", "seq-cls-3", lambda out, dev: {"checkpoint": "base", "output": out, "num_labels": NUM_LABELS,
                                                         "task": "sequence_classification", "device": dev},
            "attach-head", 1.1),
    Variant("surgery", "ev+head+lora", _surgery, "surgery", 1.4,
            note="extend-vocab (mean) + attach-head (3 labels) + attach-lora (r=16)"),
    Variant("verify", "extend-vocab", lambda out, dev: {"checkpoint": "base", "patched": PATCHED, "device": dev},
            "verify", 2.3, ours_memory=2.3, reads_weights=True,
            note="base vs its extend-vocab (mean) output; both load each model in float32 in turn",
            prepare=("extend-vocab", _prepare_patched, PATCHED)),
    Variant("merge-lora", "lora-r16", lambda out, dev: {"checkpoint": "base", "output": out,
                                                        "adapters": [{"path": ADAPTER}], "device": dev},
            "merge-lora", 1.6, reads_weights=True, prepare=("attach-lora", _prepare_adapter, ADAPTER),
            note="attach-lora's r=16 all-linear adapter folded in (B = 0 at init: the cost does not depend on the "
                 "values); the anchor: peft PeftModel.from_pretrained + merge_and_unload + save_pretrained"),
    Variant("convert-adapter", "pissa-r16", _convert, "convert-adapter", 1.6, reads_weights=True,
            prepare=("attach-lora", _prepare_pissa, PISSA_ADAPTER), after_prepare=_copy_trained,
            note="attach-lora's pissa_niter_4 adapter (standing for the trained one: the cost does not depend on the "
                 "values) converted to a plain LoRA of rank 32; the anchor: peft's save_pretrained("
                 "path_initial_model_for_weight_conversion=...) on the residual base"),
    Variant("expand-blocks", f"zero-{NUM_BLOCKS}", lambda out, dev: {"checkpoint": "base", "output": out,
                                                                     "num_blocks": NUM_BLOCKS, "device": dev},
            "expand-blocks", 1.6, reads_weights=True,
            note=f"{NUM_BLOCKS} zero-init blocks interleaved (LLaMA Pro); the anchor: transformers load + block "
                 "insertion (deep copies, o_proj/down_proj zeroed) + save_pretrained"),
]


def select(ops: str) -> list[Variant]:
    """``extend-vocab,attach-lora:dora``: whole operations or single variants (``all`` for every one)."""
    wanted = [w.strip() for w in ops.split(",") if w.strip()]
    if wanted == ["all"]:
        return list(VARIANTS)
    chosen = [v for v in VARIANTS if v.op in wanted or v.key in wanted]
    unknown = [w for w in wanted if not any(w in (v.op, v.key) for v in VARIANTS)]
    if unknown:
        raise SystemExit(f"unknown operation(s) {unknown}; choose from {sorted({v.key for v in VARIANTS})}")
    return chosen
