"""Opening a checkpoint (a Hugging Face model directory or a bare ``.safetensors`` file) lazily.

Opening reads only headers, the index and small JSON files; tensor data is read on request, by rows, so
that no operation ever holds a whole checkpoint in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapter_surgery.errors import InvalidCheckpoint, NotFound
from adapter_surgery.io.header import ShardHeader, TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
#: Weight formats that can run code when loaded; they are refused, never unpickled.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "merges.txt", "special_tokens_map.json", "added_tokens.json")
#: Rows read at a time are capped at this many bytes, to bound memory on large embeddings.
CHUNK_BYTES = 64 * 1024 * 1024


@dataclass
class Checkpoint:
    """A checkpoint opened for reading: validated headers, the index, ``config.json``, tokenizer presence.

    Attributes:
        root: the model directory, or the bare file's path.
        shards: shard file name -> validated header, in index order.
        weight_map: tensor name -> shard file name.
        index_metadata: the index's ``metadata`` (``None`` for a single file without index).
        config: ``config.json`` as a dict, ``None`` when absent or unusable (see ``config_problem``).
        bytes_read: tensor-data bytes read so far through this object (headers excluded).
    """

    root: Path
    shards: dict[str, ShardHeader]
    weight_map: dict[str, str]
    index_metadata: dict[str, object] | None
    config: dict[str, object] | None
    config_problem: str | None = None
    warnings: list[str] = field(default_factory=list)
    bytes_read: int = 0

    @property
    def is_file(self) -> bool:
        """True for a bare ``.safetensors`` file (no config, no tokenizer)."""
        return self.root.is_file()

    @property
    def directory(self) -> Path:
        return self.root.parent if self.is_file else self.root

    @property
    def has_index(self) -> bool:
        return self.index_metadata is not None

    @property
    def has_tokenizer(self) -> bool:
        return not self.is_file and any((self.root / name).is_file() for name in TOKENIZER_FILES)

    @classmethod
    def open(cls, path: Path) -> Checkpoint:
        """Open ``path`` (a model directory or a ``.safetensors`` file) and validate every header.

        Raises:
            NotFound: the path does not exist.
            InvalidCheckpoint: a pickle-based format, no safetensors weights, a bad header, an index that
                names a missing shard or maps a tensor to a shard that lacks it.
        """
        if not path.exists():
            raise NotFound(f"checkpoint {str(path)!r} does not exist", field="checkpoint",
                           fix="Give a model directory or a .safetensors file under the data directory.")
        if path.is_file():
            return cls._open_file(path)
        if not path.is_dir():
            raise InvalidCheckpoint(f"checkpoint {str(path)!r} is neither a regular file nor a directory",
                                    field="checkpoint", fix="Give a model directory or a .safetensors file.")
        return cls._open_dir(path)

    @classmethod
    def _open_file(cls, path: Path) -> Checkpoint:
        if path.suffix in PICKLE_SUFFIXES:
            raise _pickle_refused(path.name)
        if path.suffix != ".safetensors":
            raise InvalidCheckpoint(f"{path.name} is not a .safetensors file", field="checkpoint",
                                    fix="Give a model directory or a .safetensors file.")
        header = read_header(path)
        return cls(path, {path.name: header}, dict.fromkeys(header.tensors, path.name), None, None,
                   "a bare .safetensors file has no config.json")

    @classmethod
    def _open_dir(cls, root: Path) -> Checkpoint:
        config, problem = _read_config(root)
        index_path = root / INDEX_NAME
        warnings: list[str] = []
        if index_path.is_file():
            weight_map, index_metadata = _read_index(index_path)
            shards = {}
            for shard in dict.fromkeys(weight_map.values()):
                shard_path = root / shard
                if not shard_path.is_file() or Path(shard).name != shard:
                    raise InvalidCheckpoint(
                        f"{INDEX_NAME} names shard {shard!r}, which is not in the checkpoint directory",
                        field="checkpoint", fix="Supply every shard the index names, or regenerate the index.")
                shards[shard] = read_header(shard_path)
            for name, shard in weight_map.items():
                if name not in shards[shard].tensors:
                    raise InvalidCheckpoint(f"{INDEX_NAME} maps tensor {name!r} to {shard}, which does not hold it",
                                            field="checkpoint", fix="Regenerate the index from the shards.")
            for shard, header in shards.items():
                stray = [t for t in header.tensors if weight_map.get(t) != shard]
                if stray:
                    warnings.append(f"{shard} holds {len(stray)} tensor(s) the index does not map to it "
                                    f"(e.g. {stray[0]!r}); transformers ignores them, and so does the output")
            return cls(root, shards, weight_map, index_metadata, config, problem, warnings)
        files = sorted(p for p in root.glob("*.safetensors") if p.is_file())
        if not files:
            pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise _pickle_refused(pickles[0])
            raise InvalidCheckpoint(f"{root.name} holds no .safetensors weights", field="checkpoint",
                                    fix="Give a save_pretrained directory (safetensors) or a .safetensors file.")
        if len(files) > 1 and not (root / SINGLE_NAME).is_file():
            raise InvalidCheckpoint(
                f"{root.name} holds {len(files)} .safetensors files but no {INDEX_NAME}", field="checkpoint",
                fix="Add the shard index (save_pretrained writes it) or keep a single model.safetensors.")
        single = root / SINGLE_NAME if (root / SINGLE_NAME).is_file() else files[0]
        header = read_header(single)
        return cls(root, {single.name: header}, dict.fromkeys(header.tensors, single.name), None, config,
                   problem, warnings)

    # -- tensors -------------------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def info(self, name: str) -> TensorInfo:
        return self.shards[self.weight_map[name]].tensors[name]

    def path_of(self, name: str) -> Path:
        return self.shards[self.weight_map[name]].path

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the headers alone."""
        return {name: self.info(name).shape for name in self.weight_map}

    def read_rows(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of tensor ``name`` (dimension 0), in its stored dtype, on the CPU.

        Only those rows' bytes are read (``os.pread``); the result owns its memory.

        Raises:
            InvalidCheckpoint: the dtype has no torch equivalent (e.g. F4), or the tensor is 0-d.
        """
        info = self.info(name)
        if info.torch_dtype is None or not info.shape:
            raise InvalidCheckpoint(f"tensor {name!r} ({info.dtype}, shape {list(info.shape)}) cannot be read by rows",
                                    field="checkpoint")
        rows = info.shape[0]
        stop = rows if stop is None else min(stop, rows)
        row_bytes = info.nbytes // rows if rows else 0
        buf = bytearray(row_bytes * max(stop - start, 0))
        if buf:
            with self.path_of(name).open("rb", buffering=0) as fh:
                view, offset, done = memoryview(buf), info.begin + start * row_bytes, 0
                while done < len(buf):
                    n = os.preadv(fh.fileno(), [view[done:]], offset + done)
                    if n <= 0:
                        raise InvalidCheckpoint(f"{self.path_of(name).name} ended while reading {name!r}",
                                                field="checkpoint")
                    done += n
        self.bytes_read += len(buf)
        out = torch.frombuffer(buf, dtype=info.torch_dtype) if buf else torch.empty(0, dtype=info.torch_dtype)
        return out.reshape(stop - start, *info.shape[1:])

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor ``name`` in its stored dtype (use ``iter_rows`` for large ones)."""
        return self.read_rows(name)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """The whole tensor ``name`` read into ``out`` (a contiguous CPU tensor of its stored dtype and shape, e.g. a
        buffer reused from one tensor to the next, so that no fresh memory is faulted in); returns ``out``.

        Raises:
            InvalidCheckpoint: the file ends early. ValueError: ``out`` does not fit the tensor.
        """
        info = self.info(name)
        if (out.dtype != info.torch_dtype or tuple(out.shape) != info.shape or not out.is_contiguous()
                or out.device.type != "cpu"):
            raise ValueError(f"{name} is {info.dtype} {list(info.shape)}; got a {out.dtype} {list(out.shape)} buffer")
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if info.nbytes else memoryview(b"")
        if info.nbytes:
            with self.path_of(name).open("rb", buffering=0) as fh:
                done = 0
                while done < info.nbytes:
                    n = os.preadv(fh.fileno(), [view[done:]], info.begin + done)
                    if n <= 0:
                        raise InvalidCheckpoint(f"{self.path_of(name).name} ended while reading {name!r}",
                                                field="checkpoint")
                    done += n
        self.bytes_read += info.nbytes
        return out

    def iter_rows(self, name: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(first_row, rows)`` chunks of tensor ``name`` of at most ``chunk_bytes`` each."""
        info = self.info(name)
        rows = info.shape[0]
        step = max(1, chunk_bytes // max(1, info.nbytes // max(rows, 1)))
        for start in range(0, rows, step):
            yield start, self.read_rows(name, start, start + step)

    def scan_rows(self, name: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, torch.Tensor]]:
        """As :meth:`iter_rows`, for a reader that is done with each chunk before it asks for the next (statistics
        over the rows): every chunk is read into the same buffer, so that memory is touched (page faults, zeroing)
        once per tensor instead of once per chunk. A chunk is overwritten by the next one: copy what must outlive
        it."""
        info = self.info(name)
        if info.torch_dtype is None or not info.shape:
            yield from self.iter_rows(name, chunk_bytes)  # read_rows refuses it
            return
        rows = info.shape[0]
        row_bytes = info.nbytes // rows if rows else 0
        step = max(1, chunk_bytes // max(1, row_bytes))
        buf = torch.empty(min(step, rows) * row_bytes, dtype=torch.uint8)
        path = self.path_of(name)
        with path.open("rb", buffering=0) as fh:
            for start in range(0, rows, step):
                stop = min(rows, start + step)
                view = memoryview(buf.numpy())[: (stop - start) * row_bytes]
                offset, done = info.begin + start * row_bytes, 0
                while done < len(view):
                    n = os.preadv(fh.fileno(), [view[done:]], offset + done)
                    if n <= 0:
                        raise InvalidCheckpoint(f"{path.name} ended while reading {name!r}", field="checkpoint")
                    done += n
                self.bytes_read += len(view)
                chunk = buf[: len(view)].view(info.torch_dtype) if len(view) else torch.empty(0, dtype=info.torch_dtype)
                yield start, chunk.reshape(stop - start, *info.shape[1:])

    def other_files(self) -> list[Path]:
        """Files of the model directory that are neither weights nor the index (config, tokenizer, ...)."""
        if self.is_file:
            return []
        skip = set(self.shards) | {INDEX_NAME}
        return sorted(p for p in self.root.iterdir()
                      if p.is_file() and p.name not in skip and not p.name.endswith(PICKLE_SUFFIXES)
                      and p.suffix != ".safetensors")


def _read_config(root: Path) -> tuple[dict[str, object] | None, str | None]:
    path = root / "config.json"
    if not path.is_file():
        return None, "the checkpoint has no config.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, over 4300 digits
        return None, f"config.json is not valid JSON ({exc})"
    if not isinstance(doc, dict):
        return None, "config.json is not a JSON object"
    return doc, None


def _read_index(path: Path) -> tuple[dict[str, str], dict[str, object]]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, over 4300 digits
        raise InvalidCheckpoint(f"{path.name} is not valid JSON ({exc})", field="checkpoint",
                                fix="Regenerate the index with save_pretrained.") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise InvalidCheckpoint(f"{path.name} has no weight_map of tensor names to shard files",
                                field="checkpoint", fix="Regenerate the index with save_pretrained.")
    metadata = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    return weight_map, metadata


def _pickle_refused(name: str) -> InvalidCheckpoint:
    return InvalidCheckpoint(
        f"{name} is a pickle-based weight file; only safetensors are read (pickles can run code when loaded)",
        field="checkpoint",
        fix="Convert it once in a trusted environment: load it and call save_pretrained(..., safe_serialization=True).")
