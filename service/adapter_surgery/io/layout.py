"""The byte layout ``safetensors``' ``save_file`` gives a set of tensors, known from their names, dtypes and shapes
alone, so that a file can be written (and hashed) before, or while, its values are computed, byte-identical to what
``save_file`` writes once they all exist.

``save_file`` (``safetensors`` 0.8, Rust ``safetensors::tensor::prepare``/``serialize``) orders the tensors by dtype
(descending alignment), then by name; the header is compact JSON (``"__metadata__"`` first, then each tensor's
``{"dtype", "shape", "data_offsets"}`` in that order), padded with spaces to a multiple of 8 bytes, after its 8-byte
little-endian length. Only one dtype per file is planned here (the tie-break between dtypes is the Rust enum's
order, which nothing here needs): ``tests/io/test_layout.py`` checks the bytes against ``save_file``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from adapter_surgery.io.header import DTYPES, TensorInfo, encode_header


@dataclass(frozen=True)
class Layout:
    """A whole planned file: its header bytes (length prefix included), its tensors in file order, its size."""

    header: bytes
    tensors: tuple[TensorInfo, ...]

    @property
    def size(self) -> int:
        return self.tensors[-1].end if self.tensors else len(self.header)


def layout(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None) -> Layout:
    """The layout ``save_file`` gives ``(name, dtype, shape)`` entries (all of one safetensors dtype) and
    ``metadata`` (module docstring).

    Raises:
        ValueError: an unknown dtype, several dtypes, a repeated name.
    """
    dtypes = {dtype for _, dtype, _ in entries}
    if len(dtypes) > 1 or not dtypes <= set(DTYPES):
        raise ValueError(f"one known safetensors dtype per planned file, not {sorted(dtypes)}")
    if len({name for name, _, _ in entries}) != len(entries):
        raise ValueError("a tensor name is planned twice")
    ordered = sorted(entries, key=lambda e: e[0].encode("utf-8"))  # Rust compares Strings bytewise
    doc: dict[str, object] = {} if metadata is None else {"__metadata__": metadata}
    offset, spans = 0, []
    for name, dtype, shape in ordered:
        bits = math.prod(shape) * DTYPES[dtype].bits
        nbytes = (bits + 7) // 8
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        spans.append((name, dtype, tuple(shape), offset, offset + nbytes))
        offset += nbytes
    header = encode_header(doc)
    start = len(header)
    return Layout(header,
                  tuple(TensorInfo(n, d, s, start + b, start + e) for n, d, s, b, e in spans))
