"""attach-lora's output: the adapter as ``PeftModel.save_pretrained`` writes it, the residual base of PiSSA/OLoRA
(each byte written once), and the result's description of the targets."""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from adapter_surgery.errors import InvalidCheckpoint
from adapter_surgery.io import Checkpoint
from adapter_surgery.io.header import TORCH_TO_SAFETENSORS
from adapter_surgery.io.writer import (
    Changes,
    HashFollower,
    ReservedTensor,
    WrittenFile,
    tensor_bytes,
    write_checkpoint,
)
from adapter_surgery.model.roles import Architecture
from adapter_surgery.ops.attach_lora import peft_bridge as bridge
from adapter_surgery.ops.attach_lora.spec import ADAPTER_WEIGHTS, ResidualBase, TargetModule
from adapter_surgery.ops.attach_lora.targets import Target, ckpt_key
from adapter_surgery.ops.common import FileInfo, RunContext


class Residuals:
    """The residual base, each byte written once: a residual has its original's name, dtype and shape, so the
    rewritten shards' layout is known before peft runs. They are created first (every other tensor copied by the
    kernel, room reserved for each decomposed target, the index and side files as they are); each residual is then
    written at its offset as peft produces it (memory: one target), on a worker thread while the next target
    decomposes, and each rewritten shard hashed once, from the page cache on another thread, as far as its bytes are
    final (:class:`HashFollower`: up to the first range not yet written), so that the digests are ready about when
    the last residual is written. Untouched shards are linked."""

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
        self._fds = {path: os.open(path, os.O_WRONLY) for path in dict.fromkeys(p for p, _ in self._at.values())}
        self.done: set[str] = set()
        self.dest = dest
        self._todo = [f for f in self.files.values() if not f.linked and f.sha256 is None]
        # per rewritten file: its reserved ranges in file order, and the follower hashing what precedes the first
        # one not yet written
        self._ranges: dict[Path, list[tuple[int, str]]] = {dest / f.path: [] for f in self._todo}
        for key, (path, info) in sorted(self._at.items(), key=lambda kv: kv[1][1].begin):
            self._ranges[path].append((info.begin, key))
        self._pool = ThreadPoolExecutor(max_workers=1 + len(self._todo))
        self._followers = {path: HashFollower(path) for path in self._ranges}
        self._digests = {path: self._pool.submit(f.run) for path, f in self._followers.items()}
        self._pending: Future[None] | None = None
        self._error: BaseException | None = None
        for path in self._ranges:
            self._advance(path)

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` as the residual of ``key``, on the worker thread: ``tensor`` must stay unchanged until the
        next :meth:`add` (or :meth:`close`) returns, which waits for this write."""
        planned = self.planned[key]
        if TORCH_TO_SAFETENSORS[tensor.dtype] != planned.dtype or tuple(tensor.shape) != planned.shape:
            raise RuntimeError(f"the residual of {key} is {tensor.dtype} {tuple(tensor.shape)}, not its original's "
                               f"{planned.dtype} {planned.shape}")
        self._wait()
        self._pending = self._pool.submit(self._write, key, tensor_bytes(tensor))

    def _write(self, key: str, view: memoryview) -> None:
        path, info = self._at[key]
        done = 0
        while done < len(view):
            done += os.pwrite(self._fds[path], view[done:], info.begin + done)
        start_writeback(self._fds[path], info.begin, len(view))
        self.done.add(key)
        self._advance(path)

    def _advance(self, path: Path) -> None:
        """Tell ``path``'s follower how far its bytes are final (all of them once every residual is written)."""
        ranges = self._ranges[path]
        while ranges and ranges[0][1] in self.done:
            ranges.pop(0)
        if ranges:
            self._followers[path].advance(ranges[0][0])
        else:
            self._followers[path].finish(path.stat().st_size)

    def _wait(self) -> None:
        """Wait for the write in flight; its error is raised (and kept, for :meth:`finish`)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.result()
            except BaseException as exc:
                self._error = exc
                raise

    def close(self) -> None:
        """Wait for the last write, sync and close the files; on failure too (of the write or of a sync) every file
        is closed, the followers stop and the worker threads end, then the first error is raised (a write's error
        already raised by :meth:`add` again: it, not a later sync's, is the cause the caller hears)."""
        errors: list[BaseException] = [self._error] if self._error is not None else []
        try:
            self._wait()
        except BaseException as exc:
            errors.append(exc)
        for fd in self._fds.values():
            try:
                os.fsync(fd)
            except OSError as exc:
                errors.append(exc)
            finally:
                os.close(fd)
        self._fds = {}
        if errors and self._error is None:
            self._error = errors[0]
        if self.done != set(self.planned) or self._error is not None:
            for follower in self._followers.values():
                follower.abandon()
        self._pool.shutdown(wait=True)
        if errors:
            raise errors[0]

    def finish(self) -> dict[str, WrittenFile]:
        """Every output shard with its digest (each rewritten one hashed once, while it was written)."""
        self.close()
        if self._error is not None:
            raise self._error
        if self.done != set(self.planned):  # a reserved range never written would read as zeros: refuse
            raise RuntimeError(f"peft produced no residual for {sorted(set(self.planned) - self.done)}")
        digests = {path: d.result() for path, d in self._digests.items()}
        if self.cache is not None:  # a request on this output links these shards and reads nothing
            for path, digest in digests.items():
                self.cache.store(path, digest)
        return {**self.files, **{f.path: dataclasses.replace(f, sha256=digests[self.dest / f.path])
                                 for f in self._todo}}


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing ``[offset, offset + length)`` of ``fd`` to disk now, without waiting (Linux
    ``sync_file_range(SYNC_FILE_RANGE_WRITE)``), so that the ``fsync`` at the end finds little left to write: the
    kernel would otherwise hold a 2 GB residual base dirty until that ``fsync`` (its background writeback starts at
    10% of memory). A no-op where the call does not exist."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range():  # -> ctypes function | None
    try:
        import ctypes

        fn = ctypes.CDLL("libc.so.6", use_errno=True).sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        return fn
    except (OSError, AttributeError):  # not glibc on Linux: the fsync at the end does it all
        return None


_SYNC_FILE_RANGE = _load_sync_file_range()


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


#: The metadata ``PeftModel.save_pretrained`` gives the adapter's safetensors file.
SAFETENSORS_METADATA = {"format": "pt"}


def save_adapter(out: Path, state: dict[str, torch.Tensor], config, base_path: str, task_type: str | None,
                 model_class: type, decompose: bool) -> None:
    """Write the adapter as ``PeftModel.save_pretrained`` does (safetensors + ``{"format": "pt"}``, config JSON)."""
    from safetensors.torch import save_file

    save_file(state, str(out / ADAPTER_WEIGHTS), metadata=SAFETENSORS_METADATA)
    save_adapter_config(out, config, base_path, task_type, model_class, decompose)


def save_adapter_config(out: Path, config, base_path: str, task_type: str | None, model_class: type,
                        decompose: bool) -> None:
    """Write ``adapter_config.json`` as ``PeftModel.save_pretrained`` does, pointing at ``base_path``."""
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
        f = bridge.factors(module)
        out.append(target_module(by_name[name], f.r, f.lora_alpha, f.scaling, list(f.lora_A.shape),
                                 list(f.lora_B.shape)))
    return in_target_order(out, targets)


def target_module(t: Target, r: int, lora_alpha: float, scaling: float, lora_A: list[int],
                  lora_B: list[int]) -> TargetModule:
    """One adapted target as the result lists it: what planning found (``t``) and what its adapter got."""
    return TargetModule(name=t.name, kind=t.kind, in_features=t.in_features, out_features=t.out_features,
                        experts=t.experts, weight_dtype=t.weight_dtype, r=r, lora_alpha=lora_alpha, scaling=scaling,
                        lora_A=lora_A, lora_B=lora_B)


def in_target_order(modules: list[TargetModule], targets: list[Target]) -> list[TargetModule]:
    """``modules`` in the planned targets' order."""
    order = {t.name: i for i, t in enumerate(targets)}
    return sorted(modules, key=lambda m: order[m.name])


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


