"""Checkpoints and the extend-vocab call that the verify operation's tests and the report library's tests share."""

from __future__ import annotations

from pathlib import Path

from adapter_surgery.ops.common import RunContext
from adapter_surgery.ops.extend_vocab import ExtendVocabSpec, extend_vocab
from tests.fixtures import make

NEW = ["<a>", "<b>", "zzzq"]


def make_data(tmp_path_factory) -> Path:
    """The data directory of a test module (its ``data`` fixture): FX-A, FX-B, FX-D and FX-F."""
    root = tmp_path_factory.mktemp("data")
    for name in ("FX-A", "FX-B", "FX-D", "FX-F"):
        make(name, root)
    return root


def extend(data: Path, src: str, out: str, **options):
    return extend_vocab(ExtendVocabSpec(checkpoint=src, output=out, tokens=NEW, verify=True, **options),
                        RunContext(data))
