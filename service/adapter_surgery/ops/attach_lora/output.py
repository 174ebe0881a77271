"""attach-lora's output: the adapter as ``PeftModel.save_pretrained`` writes it, the residual base of PiSSA/OLoRA
(each byte written once), and the result's description of the targets."""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from adapter_surgery.errors import InvalidCheckpoint
from adapter_surgery.io import Checkpoint
from adapter_surgery.io.header import TORCH_TO_SAFETENSORS
from adapter_surgery.io.writer import Changes, ReservedTensor, WrittenFile, sha256_of, tensor_bytes, write_checkpoint
from adapter_surgery.model.roles import Architecture
from adapter_surgery.ops.attach_lora import peft_bridge as bridge
from adapter_surgery.ops.attach_lora.spec import ADAPTER_WEIGHTS, ResidualBase, TargetModule
from adapter_surgery.ops.attach_lora.targets import Target, ckpt_key
from adapter_surgery.ops.common import FileInfo, RunContext


class Residuals:
    """The residual base, each byte written once: a residual has its original's name, dtype and shape, so the
    rewritten shards' layout is known before peft runs. They are created first (every other tensor copied by the
    kernel, room reserved for each decomposed target, the index and side files as they are); each residual is then
    written at its offset as peft produces it (memory: one target), and each rewritten shard hashed once at the end.
    Untouched shards are linked."""

    def __init__(self, ckpt: Checkpoint, targets: list[Target], dest: Path, ctx: RunContext) -> None:
        self.planned = {t.key: t.info for t in targets}
        self.cache = ctx.digests
        reserved = {k: ReservedTensor(i.dtype, i.shape, i.nbytes) for k, i in self.planned.items()}
        self.files = write_checkpoint(ckpt, dest, Changes(replace=dict(reserved)), ctx, cache=ctx.digests,
                                      hash_rewritten=False)
        for path in ckpt.other_files():
            shutil.copyfile(path, dest / path.name)
        out = Checkpoint.open(dest)  # the headers just written: where each residual goes
        self._at = {k: (out.path_of(k), out.info(k)) for k in self.planned}
        self._fds = {path: os.open(path, os.O_WRONLY) for path, _ in self._at.values()}
        self.done: set[str] = set()
        self.dest = dest

    def add(self, key: str, tensor: torch.Tensor) -> None:
        path, info = self._at[key]
        planned = self.planned[key]
        if TORCH_TO_SAFETENSORS[tensor.dtype] != planned.dtype or tuple(tensor.shape) != planned.shape:
            raise RuntimeError(f"the residual of {key} is {tensor.dtype} {tuple(tensor.shape)}, not its original's "
                               f"{planned.dtype} {planned.shape}")
        view, done = tensor_bytes(tensor), 0
        while done < len(view):
            done += os.pwrite(self._fds[path], view[done:], info.begin + done)
        self.done.add(key)

    def close(self) -> None:
        for fd in self._fds.values():
            os.fsync(fd)
            os.close(fd)
        self._fds = {}

    def finish(self) -> dict[str, WrittenFile]:
        """Every output shard with its digest (the rewritten ones hashed now, once each)."""
        self.close()
        if self.done != set(self.planned):  # a reserved range never written would read as zeros: refuse
            raise RuntimeError(f"peft produced no residual for {sorted(set(self.planned) - self.done)}")
        todo = [f for f in self.files.values() if not f.linked and f.sha256 is None]
        with ThreadPoolExecutor(max_workers=min(2, len(todo) or 1)) as pool:
            digests = list(pool.map(lambda f: sha256_of(self.dest / f.path, self.cache), todo))
        return {**self.files, **{f.path: dataclasses.replace(f, sha256=d) for f, d in zip(todo, digests, strict=True)}}


def adapter_state_dict(tuner: nn.Module, ckpt: Checkpoint, arch: Architecture,
                       dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``get_peft_model_state_dict`` of the adapter; tensors peft copies from the base are read from the checkpoint.

    Adapter tensors (lora_*, trainable token rows) are cast to ``dtype``; copies of base modules keep the base dtype.
    """
    state = bridge.adapter_state_dict(tuner)
    model = tuner.model
    prefix = getattr(model, "base_model_prefix", "") or ""
    out: dict[str, torch.Tensor] = {}
    cache: dict[str, torch.Tensor] = {}  # a tied embedding/head saved under two names is read once
    for key, value in state.items():
        read = value.is_meta
        if read:
            value = from_checkpoint(key, value, model, ckpt, prefix, arch, cache)
        if bridge.is_adapter_tensor(key):
            value = value.to(dtype)
        value = value.detach().cpu().contiguous()
        out[key] = value.clone() if read else value  # one checkpoint read may back two keys: never share storage
    return out


def from_checkpoint(key: str, meta: torch.Tensor, model: nn.Module, ckpt: Checkpoint, prefix: str,
                    arch: Architecture, cache: dict[str, torch.Tensor]) -> torch.Tensor:
    """The value of a saved tensor that peft copied from the base (still on meta here), read from the checkpoint.

    ``cache`` (checkpoint key -> tensor) is the caller's memo of whole tensors read, filled here.
    """
    saved = bridge.saved_key(key)
    src = ckpt_key(ckpt, saved.name, prefix, arch)
    if saved.token_rows:
        if src is None:
            raise InvalidCheckpoint(f"no checkpoint tensor for {saved.name}", field="checkpoint")
        ids = bridge.token_indices(model, saved.module)
        rows = torch.cat([ckpt.read_rows(src, i, i + 1) for i in ids]) if ids else torch.empty(0)
        return rows.to(meta.dtype).reshape(meta.shape)
    if src is None:
        raise InvalidCheckpoint(f"the adapter saves {saved.name}, which is not a tensor of the checkpoint",
                                field="checkpoint", fix="Check modules_to_save and bias against the checkpoint.")
    if src not in cache:
        cache[src] = ckpt.read(src)
    value = cache[src]
    if tuple(value.shape) != tuple(meta.shape):
        raise InvalidCheckpoint(f"{src} has shape {list(value.shape)}; the model expects {list(meta.shape)}",
                                field="checkpoint")
    return value.to(meta.dtype)


def save_adapter(out: Path, state: dict[str, torch.Tensor], config, base_path: str, task_type: str | None,
                  model_class: type, decompose: bool) -> None:
    """Write the adapter as ``PeftModel.save_pretrained`` does (safetensors + ``{"format": "pt"}``, config JSON)."""
    from safetensors.torch import save_file

    save_file(state, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    cfg = copy.deepcopy(config)
    cfg.base_model_name_or_path = base_path
    cfg.inference_mode = True
    if decompose:  # the adapter is already decomposed: loading must not run PiSSA/OLoRA again
        cfg.init_lora_weights = True
    for f in dataclasses.fields(cfg):  # sets in sorted order, so that the same request gives the same bytes
        value = getattr(cfg, f.name)
        if isinstance(value, set):
            setattr(cfg, f.name, sorted(value))
    auto_mapping = None
    if task_type is None:
        auto_mapping = {"base_model_class": model_class.__name__, "parent_library": model_class.__module__}
    bridge.save_config(cfg, out, auto_mapping)


def residual_base(ckpt: Checkpoint, residuals: Residuals, base_path: str) -> ResidualBase:
    """The base with each decomposed target replaced by its residual W - s B A; other shards linked."""
    written = residuals.finish()
    note = (f"{base_path} holds the residual base W - s*B*A of the {len(residuals.planned)} decomposed target(s); "
            "it is valid only with this adapter (use the original checkpoint for anything else)")
    return ResidualBase(path=base_path, replaced_tensors=sorted(residuals.planned),
                        rewritten_shards=[FileInfo.of(f) for f in written.values()
                                          if not f.linked and f.path in ckpt.shards],
                        linked_shards=sorted(f.path for f in written.values() if f.linked), note=note)


def describe_targets(tuner: nn.Module, targets: list[Target]) -> list[TargetModule]:
    """Each adapted target as the result lists it (rank, alpha and scaling as peft set them, factor shapes)."""
    by_name = {t.name: t for t in targets}
    out = []
    for name, module in tuner.model.named_modules():
        name = bridge.wrapped_parameter(name, module) or name  # a target parameter: its own name
        if name not in by_name or not bridge.is_lora_layer(module):
            continue
        t, f = by_name[name], bridge.factors(module)
        out.append(TargetModule(
            name=name, kind=t.kind, in_features=t.in_features, out_features=t.out_features, experts=t.experts,
            weight_dtype=t.weight_dtype, r=f.r, lora_alpha=f.lora_alpha, scaling=f.scaling,
            lora_A=list(f.lora_A.shape), lora_B=list(f.lora_B.shape)))
    order = {n: i for i, n in enumerate(by_name)}
    return sorted(out, key=lambda m: order[m.name])


def peft_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    """The warnings peft raised while building the adapter, deprecations left out."""
    keep = []
    for w in caught:
        if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
            continue
        text = str(w.message).strip()
        if text:
            keep.append(f"peft: {text}")
    return keep

