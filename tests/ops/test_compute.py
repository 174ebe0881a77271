"""ops/compute.py: buffers reused across targets, and the intra-op thread count restored."""

from __future__ import annotations

import torch

from adapter_surgery.ops.compute import Workspace, intra_op_threads


def test_a_slot_is_reused_for_smaller_shapes_and_grown_for_a_larger_one() -> None:
    work = Workspace(12, torch.device("cpu"))
    a = work.take("x", (3, 4), torch.float32)
    a.fill_(7)
    b = work.take("x", (2, 2), torch.float32)  # a view of the same storage, holding what was left there
    assert b.data_ptr() == a.data_ptr() and b.shape == (2, 2) and torch.equal(b, torch.full((2, 2), 7.0))
    assert work.take("y", (2, 2), torch.float32).data_ptr() != a.data_ptr()  # another name, another buffer
    c = work.take("x", (5, 5), torch.float32)  # larger than the slot: a new buffer
    assert c.shape == (5, 5) and c.is_contiguous() and c.data_ptr() != a.data_ptr()
    assert work.take("x", (2, 3), torch.bfloat16).dtype == torch.bfloat16


def test_intra_op_threads_are_restored_even_on_error() -> None:
    before = torch.get_num_threads()
    try:
        with intra_op_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
    except RuntimeError:
        pass
    assert torch.get_num_threads() == before
