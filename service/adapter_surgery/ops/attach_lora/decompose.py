"""attach-lora's decompositions and inits that read the base: each target's base weight handed to peft while it
builds that target's adapter (PiSSA, OLoRA, DoRA; a zero-storage stand-in for data-free inits), OLoRA on Conv1D,
and the RNG and thread set-up peft's inits run under. Formulas and sources: the package docstring."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from adapter_surgery.errors import InvalidSpec
from adapter_surgery.initializers import seeded_global_rng
from adapter_surgery.io import Checkpoint
from adapter_surgery.ops.attach_lora import peft_bridge as bridge
from adapter_surgery.ops.attach_lora.spec import DATA_FREE_INITS
from adapter_surgery.ops.attach_lora.targets import Target

if TYPE_CHECKING:
    from adapter_surgery.ops.attach_lora.output import Residuals


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the global RNG as ``torch.manual_seed(seed); get_peft_model(...)`` would, and restore it afterwards."""
    with seeded_global_rng(seed, device):
        yield


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """Run torch's CPU ops of this thread with ``n`` intra-op threads, restored afterwards.

    A data-free adapter is hundreds of small tensors (r x features each): on each of them an OpenMP parallel region
    costs more than the work, the more so on a loaded machine, where the second thread waits for a core (measured
    at 1B, 2 cores: 1.4 s of CPU with 2 threads, 0.35 s with 1). Weight-reading inits keep every thread.
    """
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Materializer:
    """Gives peft each target's base weight for the duration of its adapter's creation, then takes it back.

    Data-free inits get a zero-storage stand-in (right shape, dtype and device; peft reads only those). Others get
    the weight read from the checkpoint onto ``device``; a changed weight (PiSSA, OLoRA) goes to ``spill``.
    """

    def __init__(self, ckpt: Checkpoint, targets: list[Target], device: torch.device, init: str,
                 spill: Residuals | None) -> None:
        self.ckpt = ckpt
        self.targets = {t.name: t for t in targets}
        self.device = device
        self.init = init
        self.spill = spill
        self.needs_weights = init not in DATA_FREE_INITS
        self._freed_since_trim = 0

    def create(self, key: str, base: nn.Module, config, create: Callable[[object], nn.Module]) -> None:
        """:data:`peft_bridge.CreateHook`: give ``base`` its weight, let peft build the adapter, spill the
        residual, take the weight back."""
        target = self.targets.get(key)
        if target is None:  # the planning pass and peft disagree: refuse rather than guess
            raise InvalidSpec(f"peft targeted {key}, which the request check did not expect", field="target_modules",
                              fix="Name the target modules explicitly.")
        if target.kind == "parameter":
            self._create_parameter(base, config, create)
            return
        dtype = base.weight.dtype
        shape = tuple(base.weight.shape)
        weights_needed = self.needs_weights or config.use_dora
        weight = self._weight(target, dtype, shape, config.use_dora, weights_needed)
        base.weight = nn.Parameter(weight, requires_grad=False)
        lora = self._create(target, config, create)
        if self.spill is not None:
            self._spill(target, base, lora, config.use_dora)
        base.weight = nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False)
        for name, p in lora.named_parameters():
            if "base_layer" not in name and p.device.type not in ("cpu", "meta"):
                p.data = p.data.cpu()
        freed = weight.numel() * weight.element_size()
        del weight
        if weights_needed:
            self._trim_after(freed)

    def _trim_after(self, freed: int) -> None:
        """:func:`release_freed_memory` once :data:`TRIM_EVERY_BYTES` of weight temporaries were freed since the last
        time (a trim walks the whole heap: after each of hundreds of small targets it cost 11% of a DoRA run), so
        RSS stays within one target plus that much."""
        self._freed_since_trim += freed
        if self._freed_since_trim >= TRIM_EVERY_BYTES:
            release_freed_memory()
            self._freed_since_trim = 0

    @staticmethod
    def _create_parameter(base: nn.Module, config, create: Callable[[object], nn.Module]) -> None:
        """peft's ``lora.ParamWrapper`` for a target parameter (data-free inits: :func:`targets.parameter_targets`).

        Every parameter of the module that holds it gets a zero-storage stand-in on the CPU meanwhile (peft places
        the new adapter on the device of the target and of the module's first parameter), then its meta one back.
        """
        holder = bridge.parameter_holder(base)
        metas = dict(holder.named_parameters(recurse=False))
        for name, meta in metas.items():
            stand_in = torch.empty((), dtype=meta.dtype).expand(meta.shape)
            setattr(holder, name, nn.Parameter(stand_in, requires_grad=False))
        try:
            create(config)
        finally:
            for name, meta in metas.items():
                setattr(holder, name, meta)

    def _weight(self, target: Target, dtype: torch.dtype, shape: tuple[int, ...], dora: bool,
                weights_needed: bool) -> torch.Tensor:
        """The base weight peft sees: read onto ``device`` when the init needs it, else a stand-in."""
        if not weights_needed:  # a stand-in that owns no storage: peft reads its device and dtype only
            return torch.empty((), dtype=dtype).expand(shape)
        stored = self.ckpt.read(target.key)
        # DoRA: peft sees the base as loaded in float32, so that the magnitude is the exact norm (see the
        # package docstring); other inits see it in the dtype from_pretrained gives it
        return stored.to(self.device, torch.float32 if dora else dtype)

    def _create(self, target: Target, config, create: Callable[[object], nn.Module]) -> nn.Module:
        """peft's adapter for ``target``; OLoRA on a Conv1D factored on the right axis here."""
        if not (self.init == "olora" and target.kind == "conv1d"):
            return create(config)
        # peft's olora_init factors the (in, out) Conv1D matrix: build a plain adapter, then decompose W^T
        used = copy.copy(config)
        used.init_lora_weights = True
        lora = create(used)
        config.fan_in_fan_out = used.fan_in_fan_out  # peft sets it on the config it is given, as on its own
        olora_conv1d(lora)
        return lora

    def _spill(self, target: Target, base: nn.Module, lora: nn.Module, dora: bool) -> None:
        """Write the residual base weight (stored dtype); a DoRA magnitude becomes the norm of it as written."""
        residual = base.weight.detach().to(target.info.torch_dtype)
        self.spill.add(target.key, residual.cpu())
        if dora and residual.dtype != base.weight.dtype:  # the norm of the residual as written
            base.weight.data = residual.to(base.weight.dtype)
            bridge.update_magnitude(lora)


#: Weight temporaries freed between two :func:`release_freed_memory` calls at most (bytes).
TRIM_EVERY_BYTES = 64 << 20


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``) so that RSS stays at one target.

    glibc serves allocations below its (adaptive, up to 32 MB) mmap threshold from the heap; the weight-sized
    temporaries of each target, freed between adapters that stay alive, would otherwise fragment it and RSS would
    grow with every target although no tensor outlives its target.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():  # -> ctypes.CDLL | None
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None


_LIBC = _load_libc()


@torch.no_grad()
def olora_conv1d(lora: nn.Module) -> None:
    """OLoRA on a Conv1D (weight (in, out)): ``olora_init``'s formulas on W^T (out, in), the residual transposed back.

    W^T = Q R; B = Q[:, :r] (out, r), A = R[:r] (r, in); W - s (B A)^T (Büyükakyüz 2024, "OLoRA: Orthonormal
    Low-Rank Adaptation"; peft's ``olora_init``). A DoRA magnitude is recomputed afterwards with
    ``DoraLinearLayer.update_layer``, as peft's ``update_layer`` does after the init.
    """
    base = bridge.base_layer(lora)
    f = bridge.factors(lora)
    dtype = base.weight.dtype
    w = base.weight.detach().to(torch.float32).T
    q, rr = torch.linalg.qr(w)
    b, a = q[:, :f.r].contiguous(), rr[:f.r].contiguous()
    base.weight.data = (w - f.scaling * b @ a).T.contiguous().to(dtype)
    f.lora_A.data = a.to(dtype)
    f.lora_B.data = b.to(dtype)
    bridge.update_magnitude(lora)
