"""The planned layout (:mod:`adapter_surgery.io.layout`) against ``safetensors``' own ``save_file``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adapter_surgery.io.header import TORCH_TO_SAFETENSORS, read_header
from adapter_surgery.io.layout import layout


def _tensors(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Names whose sorted order is not their insertion order (layers.10 before layers.2, B before a), odd sizes
    (a header padded), an empty tensor and a scalar."""
    g = torch.Generator().manual_seed(0)
    names = ["m.layers.2.q.lora_A.weight", "m.layers.10.q.lora_A.weight", "m.layers.2.q.lora_B.weight",
             "m.layers.1.mlp.down.lora_A.weight", "B.x", "a.y", "é.unicode"]
    shapes = [(3, 5), (2, 7), (5, 3), (1, 1), (0, 4), (), (4,)]
    return {n: torch.randn(s, generator=g).to(dtype) for n, s in zip(names, shapes, strict=True)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("metadata", [{"format": "pt"}, None])
def test_layout_is_save_files(tmp_path: Path, dtype: torch.dtype, metadata: dict[str, str] | None) -> None:
    tensors = _tensors(dtype)
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata=metadata)
    ref = (tmp_path / "ref.safetensors").read_bytes()
    plan = layout([(n, TORCH_TO_SAFETENSORS[dtype], tuple(t.shape)) for n, t in tensors.items()], metadata)
    assert ref[: len(plan.header)] == plan.header and plan.size == len(ref)
    header = read_header(tmp_path / "ref.safetensors")
    assert [(t.name, t.begin, t.end) for t in plan.tensors] == \
        [(n, header.tensors[n].begin, header.tensors[n].end) for n in header.order]


def test_one_dtype_per_file_and_unique_names() -> None:
    with pytest.raises(ValueError, match="one known safetensors dtype"):
        layout([("a", "F32", (1,)), ("b", "BF16", (1,))], None)
    with pytest.raises(ValueError, match="one known safetensors dtype"):
        layout([("a", "F99", (1,))], None)
    with pytest.raises(ValueError, match="planned twice"):
        layout([("a", "F32", (1,)), ("a", "F32", (2,))], None)
