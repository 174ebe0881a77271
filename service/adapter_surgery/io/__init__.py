"""Checkpoint I/O: safetensors headers, lazy tensor reads, the streaming writer and atomic outputs.

Everything that touches checkpoint files lives here, so that operations only say *what* changes.
"""

from adapter_surgery.io.atomic import atomic_output
from adapter_surgery.io.checkpoint import Checkpoint
from adapter_surgery.io.header import DTYPES, ShardHeader, TensorInfo, read_header
from adapter_surgery.io.writer import (
    Changes,
    CopiedTensor,
    NewTensor,
    RowPatchedTensor,
    TensorSource,
    WrittenFile,
    describe_files,
    write_checkpoint,
)

__all__ = [
    "DTYPES",
    "Changes",
    "Checkpoint",
    "CopiedTensor",
    "NewTensor",
    "RowPatchedTensor",
    "ShardHeader",
    "TensorInfo",
    "TensorSource",
    "WrittenFile",
    "atomic_output",
    "describe_files",
    "read_header",
    "write_checkpoint",
]
