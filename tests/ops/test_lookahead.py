"""Lookahead: values in the order asked, the next one computed ahead into the other slot, errors raised where the
value is asked for, and no thread left after the with block."""

from __future__ import annotations

import threading

import pytest
import torch

from adapter_surgery.ops.lookahead import Lookahead


def lookahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("lookahead")]


def test_values_in_order_computed_ahead_in_alternating_slots() -> None:
    calls: list[tuple[str, int]] = []
    started = {n: threading.Event() for n in "abc"}

    def compute(name: str, slot: int) -> torch.Tensor:
        calls.append((name, slot))
        started[name].set()
        return torch.tensor(float(ord(name)))

    with Lookahead(["a", "b", "c"], compute, threads=1) as ahead:
        assert started["a"].wait(5)  # started before it is asked for
        assert float(ahead.get("a")) == ord("a")
        assert started["b"].wait(5)  # the next one starts once the one before is handed out
        assert float(ahead.get("b")) == ord("b") and float(ahead.get("c")) == ord("c")
    assert calls == [("a", 0), ("b", 1), ("c", 0)]
    assert lookahead_threads() == []


def test_out_of_order_request_still_gets_its_value_and_slots_keep_alternating() -> None:
    calls: list[tuple[str, int]] = []

    def compute(name: str, slot: int) -> torch.Tensor:
        calls.append((name, slot))
        return torch.tensor(float(ord(name)))

    with Lookahead(["a", "b", "c"], compute, threads=1) as ahead:
        assert float(ahead.get("c")) == ord("c")  # "a" was computed ahead for nothing
    assert calls == [("a", 0), ("c", 1)]  # "c" is last: nothing after it is computed


def test_error_is_raised_where_asked_and_no_thread_is_left() -> None:
    def compute(name: str, slot: int) -> torch.Tensor:
        if name == "b":
            raise ValueError("broken b")
        return torch.zeros(1)

    with pytest.raises(ValueError, match="broken b"), Lookahead(["a", "b", "c"], compute, threads=1) as ahead:
        ahead.get("a")
        ahead.get("b")
    assert lookahead_threads() == []


def test_error_of_a_value_never_asked_for_is_dropped_at_exit() -> None:
    def compute(name: str, slot: int) -> torch.Tensor:
        if name == "b":
            raise ValueError("broken b")
        return torch.zeros(1)

    with Lookahead(["a", "b"], compute, threads=1) as ahead:
        ahead.get("a")  # "b" fails on the worker, but the writer stopped before it
    assert lookahead_threads() == []


def test_intra_op_threads_are_set_on_the_worker_and_restored() -> None:
    seen: list[int] = []
    before = torch.get_num_threads()

    def compute(name: str, slot: int) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return torch.zeros(1)

    with Lookahead(["a"], compute, threads=1) as ahead:
        ahead.get("a")
    assert seen == [1] and torch.get_num_threads() == before
