"""lora_fold: the in-place fold gives the values of merge-lora's general path (peft's arithmetic) bit for bit, and
the finiteness check agrees with ``isfinite(...).all()``."""

from __future__ import annotations

import pytest
import torch

from adapter_surgery.ops import lora_fold
from adapter_surgery.ops.compute import Workspace
from adapter_surgery.ops.lora_fold import Delta, all_finite, fold, fold_threads


def reference(w: torch.Tensor, deltas: list[Delta]) -> torch.Tensor:
    """merge-lora's general path (and peft's ``get_delta_weight`` + merge for one adapter): fresh float32 tensors."""
    merged = w.to(torch.float32)
    for d in deltas:
        delta = (d.b @ d.a).T * d.scale if d.transposed else (d.b @ d.a) * d.scale
        merged = merged + delta
    return merged.to(w.dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The stored bits (so that -0 and +0 differ)."""
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def draw(shape: tuple[int, int], r: int, dtype: torch.dtype, transposed: bool, seed: int,
         scale: float) -> tuple[torch.Tensor, Delta]:
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    out, inp = (shape[1], shape[0]) if transposed else shape
    a = torch.randn(r, inp, generator=g) * 0.1
    b = torch.randn(out, r, generator=g) * 0.1
    return w, Delta(a, b, scale, transposed)


@pytest.mark.parametrize("block", [lora_fold.BLOCK, 1000, 1])  # one block, uneven blocks, a row per block
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("transposed", [False, True])
def test_fold_is_bitwise_the_general_path(dtype: torch.dtype, transposed: bool, block: int,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lora_fold, "BLOCK", block)
    work = Workspace(0, torch.device("cpu"))
    # a large target, then smaller and odd shapes: the reused buffers hold stale values of the one before
    for seed, (shape, r, scale) in enumerate([((384, 256), 16, 2.0), ((96, 256), 8, 0.7 * 2.0),
                                             ((33, 70), 3, 1 / 3), ((384, 256), 16, -1.3)]):
        w, delta = draw(shape, r, dtype, transposed, seed, scale)
        expected = reference(w, [delta])
        stored = work.take("stored", w.shape, dtype).copy_(w)
        got = fold(stored, [delta], work)
        assert got.dtype == dtype and got.shape == w.shape
        assert torch.equal(bits(got), bits(expected))
        assert not torch.equal(expected, w)  # the delta changed something: the comparison can fail


@pytest.mark.parametrize("block", [lora_fold.BLOCK, 1000])
def test_several_deltas_sum_in_float32_before_one_cast(block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lora_fold, "BLOCK", block)
    work = Workspace(0, torch.device("cpu"))
    w, d1 = draw((128, 64), 4, torch.bfloat16, False, 1, 2.0)
    _, d2 = draw((128, 64), 8, torch.bfloat16, False, 2, -0.5)
    _, d3 = draw((128, 64), 2, torch.bfloat16, True, 3, 4.0)
    expected = reference(w, [d1, d2, d3])
    stored = work.take("stored", w.shape, w.dtype).copy_(w)
    assert torch.equal(bits(fold(stored, [d1, d2, d3], work)), bits(expected))
    # not the same as rounding after each delta (what peft's successive merges do): the order is kept
    step = w
    for d in (d1, d2, d3):
        step = reference(step, [d])
    assert not torch.equal(step, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_all_finite_agrees_with_isfinite(dtype: torch.dtype) -> None:
    base = torch.randn(257, 31).to(dtype)
    assert all_finite(base)
    for value in (float("nan"), float("inf"), float("-inf")):
        for where in ((0, 0), (128, 17), (256, 30)):
            t = base.clone()
            t[where] = value
            assert not all_finite(t) and not bool(torch.isfinite(t).all())
    assert all_finite(torch.empty(0, 5, dtype=dtype))
    assert all_finite(torch.tensor(3.0, dtype=dtype)) and not all_finite(torch.tensor(float("nan"), dtype=dtype))
    big = torch.full((4,), torch.finfo(dtype).max, dtype=dtype)  # the largest finite values are finite
    assert all_finite(big) and all_finite(-big)


def test_fold_threads_leave_a_core_for_the_hash() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert fold_threads() == 1
        torch.set_num_threads(2)
        assert fold_threads() == 1
        torch.set_num_threads(8)
        assert fold_threads() == 7
    finally:
        torch.set_num_threads(before)
