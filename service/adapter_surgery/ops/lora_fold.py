"""W' = W + sum_i s_i B_i A_i on the CPU, bitwise as peft's ``merge_and_unload``, in buffers reused from one tensor
to the next.

Why a module of its own: merge-lora spent ~10x its copy floor here (1B, 2 cores: 25 CPU s for 2.2 GB). The
arithmetic is cheap (an r=16 GEMM is 32 flops per weight); the time went to what surrounded it: a fresh float32
tensor per step (W widened, B A, the scaled delta, the sum, the cast back; each faulted in page by page and given
back to the OS on free), mixed-dtype kernels, and ``isfinite(...).all()`` (an unvectorized bf16 kernel and a bool
tensor, as slow as the whole merge). Here every temporary lives in a :class:`~adapter_surgery.ops.compute.Workspace`
slot allocated once for the largest target, and each step is one vectorized same-dtype pass.

The values are peft's, operation for operation (``peft/tuners/lora/layer.py``: ``Linear.get_delta_weight`` is
``transpose(B @ A, fan_in_fan_out) * scaling`` in float32, ``merge`` adds it to the weight, which rounds once to the
stored dtype when the weight is bf16/f16 and the adapter float32):

- ``torch.mm(B, A, out=delta)`` is the GEMM ``B @ A`` calls (same kernel, same shapes, same summation order);
- ``delta.mul_(s)`` is ``(B @ A) * s`` (the same float32 multiply by the scalar, in place);
- ``acc.copy_(W)`` widens W exactly (bf16/f16 -> float32), ``acc.add_(delta)`` is ``W + delta`` (IEEE addition
  commutes; a transposed delta is the same values read through a view);
- ``out.copy_(acc)`` is the one round-to-nearest-even cast ``.to(dtype)`` does.

Several deltas are added in request order into the one float32 sum before the single cast, as merge-lora always did.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapter_surgery.ops.compute import Workspace


@dataclass(frozen=True)
class Delta:
    """One adapter's low-rank change to a weight: ``scale * (b @ a)``, transposed when ``transposed`` (GPT-2's
    Conv1D stores W as (in, out); embedding LoRA's delta is (B A)^T)."""

    a: torch.Tensor  # (r, in), float32
    b: torch.Tensor  # (out, r), float32
    scale: float
    transposed: bool


#: Elements per block of the element-wise passes (1 MB of float32): the scaled delta, the widened weight and their sum
#: stay in the core's cache from one pass to the next instead of each pass streaming the whole tensor through memory
#: (measured on a 5632 x 2048 bf16 target, 1 thread: 23 ms of element-wise passes whole, 11 ms in such blocks).
BLOCK = 1 << 18


@torch.no_grad()
def fold(stored: torch.Tensor, deltas: list[Delta], work: Workspace) -> torch.Tensor:
    """``stored + sum(deltas)`` computed in float32 and cast once to ``stored``'s dtype, written into ``stored``
    (a workspace buffer of the caller's: the result aliases it until the next call).

    Each ``B @ A`` is one whole GEMM (as peft computes it: a GEMM split into row blocks could take another kernel
    path); what follows it is element-wise, so it runs in row blocks of about :data:`BLOCK` elements (the same
    operations on every element: the same bits). Memory: one float32 buffer of the largest target (the delta), two
    with several deltas (their float32 sum), and a block.
    """
    if len(deltas) == 1:
        delta = _product(deltas[0], work)
        for rows in _blocks(stored):
            _add_block(stored[rows], delta[rows], deltas[0].scale, work)
        return stored
    total = work.take("sum", stored.shape, torch.float32).copy_(stored)
    for d in deltas:
        delta = _product(d, work)
        for rows in _blocks(stored):
            total[rows].add_(delta[rows].mul_(d.scale))
    return stored.copy_(total)


def _product(d: Delta, work: Workspace) -> torch.Tensor:
    """``B @ A`` (one GEMM, into the workspace), viewed in the weight's layout (transposed when ``d.transposed``)."""
    delta = work.take("delta", (d.b.shape[0], d.a.shape[1]), torch.float32)
    torch.mm(d.b, d.a, out=delta)
    return delta.T if d.transposed else delta


def _blocks(t: torch.Tensor) -> list[slice]:
    """Row ranges of ``t`` of about :data:`BLOCK` elements each (at least one row)."""
    rows = t.shape[0] if t.dim() else 1
    per_row = max(1, t.numel() // max(1, rows))
    step = max(1, BLOCK // per_row)
    return [slice(i, i + step) for i in range(0, rows, step)]


def _add_block(stored: torch.Tensor, delta: torch.Tensor, scale: float, work: Workspace) -> None:
    """``stored = (stored.float() + delta * scale).to(stored.dtype)`` on one block, in place."""
    delta.mul_(scale)
    if stored.dtype == torch.float32:
        stored.add_(delta)
        return
    wide = work.take("block", stored.shape, torch.float32).copy_(stored)
    wide.add_(delta)
    stored.copy_(wide)


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN and no +-Inf, in one vectorized reduction and no temporary tensor.

    ``torch.aminmax`` propagates NaN (torch's documentation of ``aminmax``/``amin``/``amax``) and an Inf is the
    minimum or the maximum, so both extremes are finite exactly when every element is. (``isfinite(t).all()``
    builds a bool tensor and, for bf16, runs an unvectorized kernel: measured 0.1 s against 1 ms on a 5632 x 2048
    tensor.)
    """
    if t.numel() == 0:
        return True
    if not t.is_floating_point():
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def fold_threads() -> int:
    """Intra-op threads for :func:`fold`: one core fewer than torch's default, at least one.

    Each step of a fold is a short memory-bound pass (a few ms per tensor); the writer's hash follower keeps a core
    busy hashing what was written meanwhile (``io.writer.HashFollower``). With every core in the OpenMP team, each
    pass waits for the thread that shares the hash's core: measured at 0.13B on 2 cores (warm, loaded machine),
    2.2 s wall and 2.7 CPU s per merge with 2 threads, 0.9 s and 0.8 CPU s with 1.
    """
    return max(1, torch.get_num_threads() - 1)
