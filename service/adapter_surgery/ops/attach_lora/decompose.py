"""attach-lora's decompositions and inits that read the base: each target's base weight handed to peft while it
builds that target's adapter (OLoRA, DoRA; a zero-storage stand-in for data-free inits), PiSSA and OLoRA on Conv1D
computed here, and the RNG and thread set-up peft's inits run under. Formulas and sources: the package docstring."""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import os
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
from adapter_surgery.ops.compute import Workspace

if TYPE_CHECKING:
    from adapter_surgery.ops.attach_lora.output import Residuals


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the global RNG as ``torch.manual_seed(seed); get_peft_model(...)`` would, and restore it afterwards."""
    with seeded_global_rng(seed, device):
        yield


class Materializer:
    """Gives peft each target's base weight for the duration of its adapter's creation, then takes it back.

    Data-free inits get a zero-storage stand-in (right shape, dtype and device; peft reads only those). Others get
    the weight read from the checkpoint onto ``device``; a changed weight (PiSSA, OLoRA) goes to ``spill``. PiSSA
    runs here (:func:`pissa`, peft's ``pissa_init`` operation for operation) in buffers reused from one target to
    the next (:class:`Workspace`), each residual written while the next target decomposes. ``check`` (the run
    context's ``check_cancelled``) is called before each target, so that a cancel stops the run at the next target
    (it raises ``Cancelled`` there, and the caller removes what was written).
    """

    def __init__(self, ckpt: Checkpoint, targets: list[Target], device: torch.device, init: str,
                 spill: Residuals | None, check: Callable[[], None] | None = None) -> None:
        self.ckpt = ckpt
        self.check = check
        self.targets = {t.name: t for t in targets}
        self.device = device
        self.init = init
        self.spill = spill
        self.needs_weights = init not in DATA_FREE_INITS
        self._freed_since_trim = 0
        decomposed = [t.info for t in targets if t.kind != "parameter" and t.info is not None]
        self.work = Workspace(max((math.prod(i.shape) for i in decomposed), default=0), device)
        self._turn = 0  # which of the two residual buffers the next target fills
        read = [t for t in targets if t.kind != "parameter" and t.key is not None]
        self._next = {a.name: b for a, b in itertools.pairwise(read)}  # peft's order: the model's

    def create(self, key: str, base: nn.Module, config, create: Callable[[object], nn.Module]) -> None:
        """:data:`peft_bridge.CreateHook`: give ``base`` its weight, let peft build the adapter, spill the
        residual, take the weight back."""
        if self.check is not None:
            self.check()
        target = self.targets.get(key)
        if target is None:  # the planning pass and peft disagree: refuse rather than guess
            raise InvalidSpec(f"peft targeted {key}, which the request check did not expect", field="target_modules",
                              fix="Name the target modules explicitly.")
        if target.kind == "parameter":
            self._create_parameter(base, config, create)
            return
        dtype = base.weight.dtype
        shape = tuple(base.weight.shape)
        if self.needs_weights or config.use_dora:
            self._prefetch(self._next.get(target.name))
        if self.init.startswith("pissa") and self.spill is not None:
            lora = self._create_pissa(target, base, config, create)
        else:
            weights_needed = self.needs_weights or config.use_dora
            weight = self._weight(target, dtype, shape, config.use_dora, weights_needed)
            base.weight = nn.Parameter(weight, requires_grad=False)
            lora = self._create(target, config, create)
            if self.spill is not None:
                self._spill(target, base, lora, config.use_dora)
            freed = weight.numel() * weight.element_size()
            del weight
            if weights_needed:
                self._trim_after(freed)
        base.weight = nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False)
        for name, p in lora.named_parameters():
            if "base_layer" not in name and p.device.type not in ("cpu", "meta"):
                p.data = p.data.cpu()

    def _create_pissa(self, target: Target, base: nn.Module, config,
                      create: Callable[[object], nn.Module]) -> nn.Module:
        """PiSSA on one target, as peft's ``update_layer`` runs it, in :attr:`work`'s buffers.

        peft builds the layer with ``init_lora_weights=False`` (the same draws from the global RNG: the ``nn.Linear``
        inits of A and B, no reset), then :func:`pissa` draws ``svd_lowrank``'s sample and sets A, B (cast to the
        base dtype, as ``_move_adapter_to_device_of_base_layer`` casts them) and the residual. DoRA's magnitude is
        then recomputed from the residual (peft's ``update_layer`` computes it after ``pissa_init``; here the layer
        was built on W)."""
        dtype = base.weight.dtype
        dora = bool(config.use_dora)
        stored = self.ckpt.read_into(target.key, self.work.take("stored", target.info.shape, target.info.torch_dtype,
                                                                torch.device("cpu")))
        seen_dtype = torch.float32 if dora else dtype  # what from_pretrained gives peft (DoRA: float32, see _weight)
        if stored.device == self.device and stored.dtype == seen_dtype:
            seen = stored
        elif seen_dtype == torch.float32 or seen_dtype == stored.dtype:  # one exact copy (widening, or a move)
            seen = self.work.take("float32" if seen_dtype == torch.float32 else "moved", stored.shape, seen_dtype)
            seen.copy_(stored)
        else:  # a rounding the stored values go through first, as from_pretrained would apply it
            seen = stored.to(self.device, seen_dtype)
        base.weight = nn.Parameter(seen, requires_grad=False)
        used = copy.copy(config)
        used.init_lora_weights = False
        lora = create(used)
        config.fan_in_fan_out = used.fan_in_fan_out  # peft sets it on the config it is given, as on its own
        conv1d = target.kind == "conv1d"
        w32 = seen if seen.dtype == torch.float32 else self.work.take("float32", seen.shape, torch.float32).copy_(seen)
        w = w32.T if conv1d else w32  # peft: transpose(weight.to(float32), fan_in_fan_out), (out, in)
        product = self.work.take("product", w.shape, torch.float32)
        pissa(lora, self.init, w, product)
        out = self.work.take(f"residual{self._turn}", target.info.shape, target.info.torch_dtype,
                             torch.device("cpu"))
        self._turn ^= 1
        if dora:  # the base weight peft leaves (its residual, its layout), then as attach-lora always did with it
            residual = w - product
            base.weight.data = (residual.T if conv1d else residual).to(dtype)
            written = base.weight.detach().to(target.info.torch_dtype)
            out.copy_(written)
            if written.dtype != base.weight.dtype:  # the norm of the residual as written
                base.weight.data = written.to(base.weight.dtype)
            bridge.update_magnitude(lora)
            del residual, written
        else:
            torch.sub(w, product, out=product)  # W - s B A, elementwise as peft's ``weight - scaling * B @ A``
            value = product.T if conv1d else product
            if dtype not in (torch.float32, out.dtype):  # peft rounds to the base dtype, the residual to the stored
                value = value.to(dtype)
            out.copy_(value)
        if dora or self.init == "pissa":  # temporaries outside the workspace (the exact SVD's U and V, DoRA's)
            self._trim_after(out.numel() * 4)
        self.spill.add(target.key, out)  # written on the spill's thread while the next target decomposes
        return lora

    def _prefetch(self, target: Target | None) -> None:
        """Have the kernel start reading ``target``'s weight into the page cache (``posix_fadvise(WILLNEED)``, not
        waited for), so that on a cold page cache the next target's read overlaps this one's arithmetic. A hint:
        where it cannot be given, nothing happens."""
        if target is None or target.info is None or not hasattr(os, "posix_fadvise"):
            return
        try:
            fd = os.open(self.ckpt.path_of(target.key), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, target.info.begin, target.info.nbytes, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
        except OSError:
            pass

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


@torch.no_grad()
def pissa(lora: nn.Module, init: str, w: torch.Tensor, product: torch.Tensor) -> None:
    """peft's ``pissa_init`` on ``w`` (the base weight in float32, (out, in)), operation for operation: A and B set
    on ``lora`` (cast to its parameters' dtype), s B A left in ``product`` (``w``'s shape, contiguous).

    ``"pissa"``: W = V S U^T (``torch.linalg.svd``); ``"pissa_niter_N"``: ``torch.svd_lowrank(W, r, niter=N)``
    (same sample from the global RNG as peft's call); S_r /= s; A = diag(sqrt(S_r)) U_r^T (r, in),
    B = V_r diag(sqrt(S_r)) (out, r); the residual is W - (s B) A (Meng et al. 2024, "PiSSA: Principal Singular
    Values and Singular Vectors Adaptation"; peft's ``LoraLayer.pissa_init``). Only where the results go differs:
    the product is computed into ``product`` instead of fresh memory.
    """
    f = bridge.factors(lora)
    if init == "pissa":
        v, s, uh = torch.linalg.svd(w, full_matrices=False)
        vr, sr, uhr = v[:, :f.r], s[:f.r], uh[:f.r]
        sr /= f.scaling
    else:
        vr, sr, ur = torch.svd_lowrank(w, f.r, niter=int(init.split("_niter_")[-1]))
        sr /= f.scaling
        uhr = ur.t()
    a = torch.diag(torch.sqrt(sr)) @ uhr
    b = vr @ torch.diag(torch.sqrt(sr))
    torch.matmul(f.scaling * b, a, out=product)
    f.lora_A.data = a.to(f.lora_A.device, f.lora_A.dtype)
    f.lora_B.data = b.to(f.lora_B.device, f.lora_B.dtype)


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
