"""Header validation: every violation is refused with the file and tensor named, before any data is read."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adapter_surgery.errors import InvalidCheckpoint
from adapter_surgery.io.header import read_header


def _raw(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_reads_what_safetensors_wrote(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(3, 4, dtype=torch.bfloat16), "b": torch.ones(5)}, str(tmp_path / "m.safetensors"),
              metadata={"format": "pt"})
    h = read_header(tmp_path / "m.safetensors")
    assert h.metadata == {"format": "pt"}
    assert h.tensors["a"].shape == (3, 4) and h.tensors["a"].dtype == "BF16" and h.tensors["a"].nbytes == 24
    assert h.tensors["b"].nbytes == 20
    assert sorted(h.order) == ["a", "b"]
    assert h.tensors[h.order[-1]].end == h.file_size


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"t": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype 'F33'"),
        ({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "span 8 bytes"),
        ({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "past the end of the file"),
        ({"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "non-negative integers"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, "0 <= begin <= end"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "u": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlap"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "hole of 4 bytes"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, "4 bytes after the last"),
        ({"__metadata__": {"a": 1}}, b"", "__metadata__"),
    ],
)
def test_header_violations_name_file_and_tensor(tmp_path: Path, header: dict, data: bytes, message: str) -> None:
    path = _raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(InvalidCheckpoint) as err:
        read_header(path)
    assert message in err.value.detail
    assert "bad.safetensors" in err.value.detail
    assert err.value.field == "checkpoint"
    if "t" in header and "__metadata__" not in header and "hole" not in message and "after the last" not in message:
        assert "'t'" in err.value.detail or "'u'" in err.value.detail


def test_header_length_larger_than_file(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(InvalidCheckpoint, match="declares a header of 1000000000000 bytes"):
        read_header(path)


def test_truncated_and_non_json(tmp_path: Path) -> None:
    (tmp_path / "a.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(InvalidCheckpoint, match="shorter than the 8-byte header length"):
        read_header(tmp_path / "a.safetensors")
    (tmp_path / "b.safetensors").write_bytes(struct.pack("<Q", 4) + b"{no}")
    with pytest.raises(InvalidCheckpoint, match="not valid UTF-8 JSON"):
        read_header(tmp_path / "b.safetensors")


def test_a_header_over_the_limit_says_the_limit_is_the_reason(tmp_path: Path, monkeypatch) -> None:
    """A header of 105,908,492 bytes in a file long enough said only "but the file has 106270220 bytes after the
    length", as if the file were short."""
    from adapter_surgery.io import header

    monkeypatch.setattr(header, "MAX_HEADER_BYTES", 1000)
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 2000) + b" " * 4000)
    with pytest.raises(InvalidCheckpoint) as err:
        read_header(path)
    assert "declares a header of 2000 bytes" in err.value.detail and "limit of 1000 bytes" in err.value.detail
    assert "after the length" not in err.value.detail
