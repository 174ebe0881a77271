"""Reading and validating safetensors headers without touching tensor data.

File layout (the safetensors format, https://github.com/huggingface/safetensors#format): an 8-byte
little-endian unsigned header length ``N``, ``N`` bytes of UTF-8 JSON mapping each tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the end of the header) plus an
optional ``"__metadata__"`` string map, then the data region, which the tensors cover without holes.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapter_surgery.errors import InvalidCheckpoint

#: The largest header we accept (the reference implementation's own limit is 100 MB).
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class DType:
    """A safetensors dtype: its width in bits and the torch dtype that holds it (``None``: no torch type)."""

    name: str
    bits: int
    torch_dtype: torch.dtype | None


def _dtypes() -> dict[str, DType]:
    table = {
        "BOOL": (8, torch.bool), "U8": (8, torch.uint8), "I8": (8, torch.int8),
        "I16": (16, torch.int16), "U16": (16, getattr(torch, "uint16", None)),
        "F16": (16, torch.float16), "BF16": (16, torch.bfloat16),
        "I32": (32, torch.int32), "U32": (32, getattr(torch, "uint32", None)), "F32": (32, torch.float32),
        "I64": (64, torch.int64), "U64": (64, getattr(torch, "uint64", None)), "F64": (64, torch.float64),
        "C64": (64, torch.complex64),
        "F8_E4M3": (8, getattr(torch, "float8_e4m3fn", None)), "F8_E5M2": (8, getattr(torch, "float8_e5m2", None)),
        "F8_E8M0": (8, getattr(torch, "float8_e8m0fnu", None)),
        "F6_E2M3": (6, None), "F6_E3M2": (6, None), "F4": (4, None),
    }
    return {name: DType(name, bits, dt) for name, (bits, dt) in table.items()}


#: Every dtype the safetensors format defines, by its header name.
DTYPES: dict[str, DType] = _dtypes()

#: The header name of each torch dtype we can write.
TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {
    d.torch_dtype: d.name for d in DTYPES.values() if d.torch_dtype is not None
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry. ``begin``/``end`` are absolute byte offsets in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return DTYPES[self.dtype].torch_dtype


@dataclass(frozen=True)
class ShardHeader:
    """A validated safetensors header: tensors in file order, ``__metadata__``, where the data starts."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None
    data_start: int
    file_size: int
    order: list[str] = field(default_factory=list)


def read_header(path: Path) -> ShardHeader:
    """Read and validate the header of the safetensors file at ``path``; no tensor data is read.

    Checks: the header length is sane and inside the file; the JSON is well formed; each dtype is known;
    each shape is a list of non-negative ints; ``prod(shape) * bits / 8 == end - begin``; offsets lie
    inside the data region, do not overlap and leave no holes.

    Raises:
        InvalidCheckpoint: naming the file and, where one is at fault, the tensor.
    """
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise _bad(path, f"is {size} bytes long, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise _bad(path, f"declares a header of {n} bytes, over the limit of {MAX_HEADER_BYTES} bytes (the "
                             "safetensors reference implementation's own limit)")
        if n > size - 8:
            raise _bad(path, f"declares a header of {n} bytes, but the file has {size - 8} bytes after the length")
        raw = fh.read(n)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, over 4300 digits
        raise _bad(path, f"has a header that is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise _bad(path, "has a header that is not a JSON object")
    metadata = doc.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise _bad(path, "has a __metadata__ entry that is not a map of strings to strings")
    data_start = 8 + n
    tensors = {name: _tensor_info(path, name, entry, data_start) for name, entry in doc.items()}
    order = sorted(tensors, key=lambda k: (tensors[k].begin, tensors[k].end))
    _check_coverage(path, [tensors[k] for k in order], data_start, size)
    return ShardHeader(path, tensors, metadata, data_start, size, order)


def _tensor_info(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _bad(path, "has a header entry that is not an object", name)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPES:
        raise _bad(path, f"has unknown dtype {dtype!r} (known: {', '.join(DTYPES)})", name)
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                            for d in shape)):
        raise _bad(path, f"has shape {shape!r}, which is not a list of non-negative integers", name)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(
            isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)) or offsets[0] > offsets[1]:
        raise _bad(path, f"has data_offsets {offsets!r}, which are not [begin, end] with 0 <= begin <= end", name)
    bits = math.prod(shape) * DTYPES[dtype].bits
    if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
        raise _bad(path, f"has shape {shape} of {dtype} ({bits / 8:g} bytes) but data_offsets span "
                         f"{offsets[1] - offsets[0]} bytes", name)
    return TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _check_coverage(path: Path, infos: list[TensorInfo], data_start: int, size: int) -> None:
    cursor = data_start
    for info in infos:
        if info.begin < cursor:
            raise _bad(path, "has data_offsets that overlap the previous tensor's", info.name)
        if info.begin > cursor:
            raise _bad(path, f"leaves a hole of {info.begin - cursor} bytes before this tensor's data", info.name)
        cursor = info.end
    if cursor > size:
        raise _bad(path, f"has data_offsets ending at byte {cursor}, past the end of the file ({size} bytes)",
                   infos[-1].name)
    if cursor < size:
        raise _bad(path, f"has {size - cursor} bytes after the last tensor's data that no tensor covers")


def _bad(path: Path, what: str, tensor: str | None = None) -> InvalidCheckpoint:
    where = f"{path.name}" + (f", tensor {tensor!r}," if tensor else "")
    return InvalidCheckpoint(
        f"{where} {what}",
        field="checkpoint",
        fix="Re-save the checkpoint with safetensors (e.g. save_pretrained) or restore the file from its source.",
    )


def encode_header(doc: dict[str, object]) -> bytes:
    """The bytes before a safetensors file's data: the 8-byte little-endian length, then the JSON header padded with
    spaces to a multiple of 8, compact and not ASCII-escaped, as the safetensors reference implementation writes it."""
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw
