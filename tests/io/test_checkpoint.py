"""Reading tensors by rows: scan_rows (one reused buffer) gives what iter_rows gives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adapter_surgery.errors import InvalidCheckpoint
from adapter_surgery.io import Checkpoint


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int64])
def test_scan_rows_gives_the_chunks_of_iter_rows_through_one_buffer(tmp_path: Path, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(23, 3, 2, generator=g) * 100).to(dtype)
    save_file({"a": torch.zeros(5), "t": t}, str(tmp_path / "m.safetensors"))
    ckpt = Checkpoint.open(tmp_path / "m.safetensors")
    chunk = 4 * 3 * 2 * t.element_size()  # 4 rows a chunk: 6 chunks, the last of 3 rows
    expected = [(first, rows.clone()) for first, rows in ckpt.iter_rows("t", chunk)]
    read = ckpt.bytes_read
    pointers, got = set(), []
    for first, rows in ckpt.scan_rows("t", chunk):
        pointers.add(rows.data_ptr())
        got.append((first, rows.clone()))
    assert [f for f, _ in got] == [f for f, _ in expected] == [0, 4, 8, 12, 16, 20]
    assert all(torch.equal(a, b) and a.dtype == dtype for (_, a), (_, b) in zip(got, expected, strict=True))
    assert torch.equal(torch.cat([r for _, r in got]), t) and len(pointers) == 1  # one buffer, reused
    assert ckpt.bytes_read == 2 * read == 2 * t.numel() * t.element_size()


def test_scan_rows_of_a_truncated_file_is_refused(tmp_path: Path) -> None:
    save_file({"t": torch.ones(64, 8)}, str(tmp_path / "m.safetensors"))
    ckpt = Checkpoint.open(tmp_path / "m.safetensors")
    with open(tmp_path / "m.safetensors", "r+b") as fh:  # the file shrinks after its header was read
        fh.truncate(ckpt.info("t").begin + 100)
    with pytest.raises(InvalidCheckpoint, match="ended while reading"):
        list(ckpt.scan_rows("t", 1024))
