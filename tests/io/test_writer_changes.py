"""``io.writer.Changes.merged``: the writer's changes composed from parts, none of them changed."""

from __future__ import annotations

import torch

from adapter_surgery.io import Changes, NewTensor


def _t(value: float) -> NewTensor:
    return NewTensor(torch.full((2,), value))


def test_merged_layers_other_on_top_and_changes_neither() -> None:
    grown, head, new, other_new = _t(1.0), _t(2.0), _t(3.0), _t(4.0)
    first = Changes(replace={"emb": grown, "head": head}, add={"a": (new, "emb")}, remove={"old"})
    second = Changes(replace={"head": _t(5.0)}, add={"b": (other_new, "head"), "a": (other_new, "emb")},
                     remove={"emb"})
    merged = first.merged(second)
    # a tensor the second part removes keeps no replacement; the second part wins for names both set
    assert list(merged.replace) == ["head"] and merged.replace["head"] is second.replace["head"]
    assert list(merged.add) == ["a", "b"]  # the first part's order first: the order added tensors are written in
    assert merged.add["a"] == (other_new, "emb") and merged.add["b"] == (other_new, "head")
    assert merged.remove == {"old", "emb"}
    assert first.replace == {"emb": grown, "head": head} and first.add == {"a": (new, "emb")}
    assert first.remove == {"old"} and second.remove == {"emb"} and list(second.add) == ["b", "a"]
    assert Changes().merged(first).replace == first.replace and first.merged(Changes()).add == first.add
