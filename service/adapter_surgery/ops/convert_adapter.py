"""Convert a trained PiSSA/OLoRA adapter into a plain LoRA for the original base (peft's weight conversion).

A PiSSA or OLoRA adapter is trained against its residual base W_res = W - s B0 A0 (attach-lora writes it to
``<adapter>/base``). After training, W_res + s B A = W + s (B A - B0 A0), and B A - B0 A0 = [B | -B0] [A ; A0]: a
LoRA of twice the rank on the original W. This is ``peft``'s rule (``LoraModel.subtract_mutated_init``, called by
``PeftModel.save_pretrained(path_initial_model_for_weight_conversion=...)``):

- ``lora_A`` = cat(A_trained, A_init) along the rank (dim 0); ``lora_B`` = cat(B_trained, -B_init) (dim 1);
- ``r`` and every ``rank_pattern`` value doubled; ``lora_alpha`` and ``alpha_pattern`` values doubled so that
  s = alpha / r is kept (with ``use_rslora``, s = alpha / sqrt(r): alpha times sqrt(2); peft refuses rsLoRA with
  patterns, and so does this operation); ``init_lora_weights`` true.

Only headers and the two adapters' tensors are read; nothing of the base. Tensors that do not depend on the base
(``modules_to_save`` copies, trainable token rows, biases) are kept from the trained adapter (peft's conversion
drops them). DoRA adapters are refused: their magnitude is relative to the residual base.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch
from pydantic import BaseModel, Field, StrictBool

from adapter_surgery.errors import InvalidSpec, SurgeryError
from adapter_surgery.io import describe_files
from adapter_surgery.ops.attach_lora.spec import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from adapter_surgery.ops.common import FileInfo, RunContext, StrictModel
from adapter_surgery.ops.merge_lora import Adapter, open_adapter, plan_against_base
from adapter_surgery.ops.runner import Run, begin_output, open_input
from adapter_surgery.paths import resolve_under


class ConvertAdapterOptions(StrictModel):
    base: str | None = Field(None, description="The original checkpoint (relative to the data directory) the "
                                               "converted adapter applies to; written as base_model_name_or_path. "
                                               "None: that field is left empty (pass the base to peft yourself).")


class ConvertAdapterSpec(ConvertAdapterOptions):
    """The full ``POST /convert-adapter`` request."""

    adapter: str = Field(description="The trained PiSSA/OLoRA adapter directory, relative to the data directory.")
    initial_adapter: str = Field(description="The same adapter as attach-lora wrote it, before training.")
    output: str = Field(description="Directory of the converted adapter, relative to the data directory.")
    overwrite: StrictBool = Field(False, description="Replace an existing output (atomically).")


class ConvertAdapterResult(BaseModel):
    output: str
    r: int
    lora_alpha: float
    converted_modules: int = Field(description="Modules whose lora_A/lora_B were concatenated.")
    kept_tensors: list[str] = Field(description="Tensors copied from the trained adapter as they are.")
    base_model_name_or_path: str | None
    files: list[FileInfo]
    bytes_read: int = Field(description="Tensor data read from the two adapters.")
    bytes_written: int
    warnings: list[str]
    seconds: float


def convert_adapter(spec: ConvertAdapterSpec, ctx: RunContext) -> ConvertAdapterResult:
    """Run ``spec``: write the plain-LoRA equivalent of a trained PiSSA/OLoRA adapter.

    Raises:
        NotFound, PathOutsideDataDir, OutputExists: path problems.
        InvalidSpec: ``base`` whose modules or shapes do not fit the adapter (headers only; field ``base``),
            the two adapters do not belong together (other targets, shapes, r, alpha, rsLoRA; field
            ``initial_adapter``), a DoRA adapter, rsLoRA with rank/alpha patterns (as peft), the initial adapter's
            config still says pissa/olora (peft's own refusal).
    """
    from safetensors.torch import save_file

    started = time.perf_counter()
    trained = open_adapter(ctx.data_dir, spec.adapter, "adapter")
    initial = open_adapter(ctx.data_dir, spec.initial_adapter, "initial_adapter")
    base, inputs = None, [trained.path, initial.path]
    if spec.base is not None:
        base_path = resolve_under(ctx.data_dir, spec.base, "base")
        if not base_path.exists():
            raise InvalidSpec(f"base {spec.base!r} does not exist", field="base",
                              fix="Name the original checkpoint under the data directory, or leave base out.")
        base = spec.base
        inputs.append(base_path)  # the output may not replace it either (overwrite: true would delete the base)
    run = begin_output(ctx, spec.output, spec.overwrite, inputs, started)
    config = _check_pair(trained, initial)
    _check_same_base(trained, initial, ctx.data_dir)
    if base is not None:
        _check_base_fits(trained, spec.adapter, base, run)
    pairs = _lora_pairs(trained)
    warnings: list[str] = []
    if base is None:
        warnings.append("no base given: base_model_name_or_path is empty; load with PeftModel.from_pretrained("
                        "original_base, output)")
    ctx.say(f"converting {len(pairs)} modules")
    out: dict[str, torch.Tensor] = {}
    kept: list[str] = []
    for key in trained.weights.weight_map:
        ctx.check_cancelled()
        value = trained.weights.read(key)
        if key.endswith(".lora_A.weight") or key.endswith(".lora_B.weight"):
            init = initial.weights.read(key)
            dtype = torch.promote_types(value.dtype, init.dtype)
            if key.endswith(".lora_A.weight"):
                out[key] = torch.cat([value.to(dtype), init.to(dtype)], dim=0)
            else:
                out[key] = torch.cat([value.to(dtype), -init.to(dtype)], dim=1)
        else:
            out[key] = value
            kept.append(key)
    new = _converted_config(config, base)
    with run.writing() as tmp:
        tmp.mkdir(parents=True)
        save_file(out, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(new, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        files = describe_files(tmp)
    return ConvertAdapterResult(
        output=spec.output, r=new["r"], lora_alpha=new["lora_alpha"], converted_modules=len(pairs),
        kept_tensors=sorted(kept), base_model_name_or_path=base, files=[FileInfo.of(f) for f in files],
        bytes_read=trained.weights.bytes_read + initial.weights.bytes_read, bytes_written=sum(f.bytes for f in files),
        warnings=warnings, seconds=run.seconds())


def _named_base(adapter: Adapter, data_dir: Path) -> Path | None:
    """The directory of the data directory that the adapter's ``base_model_name_or_path`` names (attach-lora writes
    the path relative to it; a PiSSA/OLoRA adapter names its own ``<adapter>/base``), or None (a hub id, elsewhere)."""
    named = adapter.config.get("base_model_name_or_path")
    if not isinstance(named, str) or not named:
        return None
    try:
        path = (data_dir / named).resolve()
        path.relative_to(data_dir.resolve())
    except (OSError, RuntimeError, ValueError):
        return None
    return path if path.is_dir() else None


def _check_same_base(trained: Adapter, initial: Adapter, data_dir: Path) -> None:
    """Refuse an initial adapter that is the trained one itself, or that was made against another base than the
    trained adapter's (each a directory of the data directory): the conversion would subtract another B0 A0."""
    if trained.path.resolve() == initial.path.resolve():
        raise InvalidSpec("adapter and initial_adapter are the same directory: the conversion would add B A and "
                          "subtract it again (a zero delta)", field="initial_adapter",
                          fix="Give the adapter attach-lora wrote (before training) as initial_adapter and its "
                              "trained copy as adapter.")
    tb, ib = _named_base(trained, data_dir), _named_base(initial, data_dir)
    if tb is not None and ib is not None and tb != ib:
        rel = data_dir.resolve()
        raise InvalidSpec(f"{str(initial.path)!r} is not the initial state of {str(trained.path)!r}: they were made "
                          f"against other bases ({str(ib.relative_to(rel))!r} and {str(tb.relative_to(rel))!r}, "
                          "their base_model_name_or_path)", field="initial_adapter",
                          fix="Give the adapter attach-lora wrote for the trained adapter's base (the one whose "
                              "residual base the trained adapter names) as initial_adapter.")


def _check_base_fits(trained: Adapter, name: str, base: str, run: Run) -> None:
    """Refuse a ``base`` the converted adapter would not load onto: every module and shape of the trained adapter is
    checked against the base's headers (as merge-lora checks them; no weights are read), field ``base``."""
    _, ckpt = open_input(run.ctx, base, "base")
    try:
        plan_against_base(trained, ckpt, run)
    except SurgeryError as exc:
        what = exc.detail.removeprefix(f"adapter {str(trained.path)!r} does not fit the checkpoint: ")
        exc.reword(f"base {base!r} does not fit adapter {name!r}: {what}", field="base",
                   fix="Give the checkpoint the adapter was made from (the original base of its residual base), or "
                       "leave base out.")
        raise


def _lora_pairs(adapter: Adapter) -> list[str]:
    keys = set(adapter.weights.weight_map)
    modules = sorted(k.removesuffix(".lora_A.weight") for k in keys if k.endswith(".lora_A.weight"))
    for m in modules:
        if f"{m}.lora_B.weight" not in keys:
            raise InvalidSpec(f"adapter {str(adapter.path)!r}: {m} has lora_A but no lora_B", field=adapter.field,
                              fix="Give a complete adapter.")
    return modules


def _check_pair(trained: Adapter, initial: Adapter) -> dict[str, object]:
    """Refuse adapters that are not a trained/initial pair of one PiSSA/OLoRA adapter; return the trained config."""
    ct, ci = trained.config, initial.config

    def refuse(what: str) -> InvalidSpec:
        return InvalidSpec(f"{str(initial.path)!r} is not the initial state of {str(trained.path)!r}: {what}",
                           field="initial_adapter", fix="Give the adapter attach-lora wrote (before training) as "
                                                        "initial_adapter and its trained copy as adapter.")

    for a in (trained, initial):
        if a.config.get("use_dora") or any(k.endswith("lora_magnitude_vector") for k in a.weights.weight_map):
            raise InvalidSpec(f"adapter {str(a.path)!r} uses DoRA; its magnitude is relative to the residual base, so "
                              "it has no plain-LoRA equivalent on the original base", field=a.field,
                              fix="Merge it onto its residual base instead (POST /merge-lora).")
        if any("lora_embedding" in k for k in a.weights.weight_map):
            raise InvalidSpec(f"adapter {str(a.path)!r} has embedding LoRA weights, which PiSSA/OLoRA do not make",
                              field=a.field, fix="Give a PiSSA/OLoRA adapter of Linear/Conv1D modules.")
    if str(ci.get("init_lora_weights")).lower().startswith(("pissa", "olora", "corda", "lora_ga")):
        raise refuse("its init_lora_weights is still the decomposition (peft refuses this too: loading it would "
                     "decompose the residual base again)")
    if ct.get("use_rslora") and (ct.get("rank_pattern") or ct.get("alpha_pattern")):
        raise InvalidSpec("peft does not convert an rsLoRA adapter with rank_pattern or alpha_pattern (the doubled "
                          "rank changes the pattern's scaling)", field="adapter",
                          fix="Merge the adapter onto its residual base instead (POST /merge-lora).")
    r, alpha = ct.get("r"), ct.get("lora_alpha")
    if not (isinstance(r, int) and 1 <= r <= 1 << 16 and isinstance(alpha, (int, float)) and math.isfinite(alpha)):
        raise InvalidSpec(f"adapter {str(trained.path)!r} has r={r!r}, lora_alpha={alpha!r} (a rank 1..65536 and a "
                          "finite number expected)", field="adapter", fix="Check adapter_config.json.")
    patterns = [ct.get("rank_pattern") or {}, ct.get("alpha_pattern") or {}]
    if not all(isinstance(p, dict) and all(isinstance(v, (int, float)) for v in p.values()) for p in patterns):
        raise InvalidSpec("rank_pattern/alpha_pattern must map names to numbers", field="adapter",
                          fix="Check adapter_config.json.")
    for k in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules"):
        if _norm(ct.get(k)) != _norm(ci.get(k)):
            raise refuse(f"{k} differs ({ct.get(k)!r} vs {ci.get(k)!r})")
    kt = {k for k in trained.weights.weight_map if ".lora_" in k}
    ki = {k for k in initial.weights.weight_map if ".lora_" in k}
    if kt != ki:
        missing = sorted(kt ^ ki)[0]
        raise refuse(f"{missing} is in only one of them")
    for k in sorted(kt):
        st, si = trained.weights.info(k).shape, initial.weights.info(k).shape
        if st != si:
            raise refuse(f"{k} has shape {list(st)} in the trained adapter and {list(si)} in the initial one")
    return ct


def _norm(value: object) -> object:
    return sorted(value) if isinstance(value, list) else value


def _converted_config(config: dict[str, object], base: str | None) -> dict[str, object]:
    """``PeftModel.save_pretrained``'s config changes for ``path_initial_model_for_weight_conversion``."""
    new = copy.deepcopy(config)
    new["init_lora_weights"] = True
    new["r"] = int(config["r"]) * 2  # type: ignore[call-overload]
    alpha = config["lora_alpha"]
    new["lora_alpha"] = alpha * 2**0.5 if config.get("use_rslora") else alpha * 2  # type: ignore[operator]
    if config.get("rank_pattern"):
        new["rank_pattern"] = {k: 2 * v for k, v in config["rank_pattern"].items()}  # type: ignore[union-attr]
    if config.get("alpha_pattern"):
        new["alpha_pattern"] = {k: 2 * v for k, v in config["alpha_pattern"].items()}  # type: ignore[union-attr]
    new["base_model_name_or_path"] = base
    new["inference_mode"] = True
    return new
