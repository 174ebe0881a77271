"""Shared test helpers: a data directory with fixtures built in it, tensor loading, sha256 of trees."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures import make


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory (all shards) or a single file."""
    files = [model_dir] if model_dir.is_file() else sorted(model_dir.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``: proves an input was not modified."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def link_tree(src: Path, dest: Path) -> Path:
    """Hard-link (else copy) the files of model directory ``src`` into ``dest``: a real checkpoint placed in a
    test's data directory without copying hundreds of MB."""
    dest.mkdir(parents=True)
    for p in src.iterdir():
        try:
            os.link(p, dest / p.name)
        except OSError:
            shutil.copyfile(p, dest / p.name)
    return dest


def full_disk_at_pwrite(monkeypatch: pytest.MonkeyPatch, nth: int) -> list[int]:
    """``os.pwrite`` raises ENOSPC at its ``nth`` call (a disk that fills mid-write); returns the offsets of the calls
    made so far (the list grows as they come)."""
    real, calls = os.pwrite, []

    def pwrite(fd: int, data, at: int) -> int:  # type: ignore[no-untyped-def]
        calls.append(at)
        if len(calls) == nth:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, at)

    monkeypatch.setattr(os, "pwrite", pwrite)
    return calls


def config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def build(data_dir: Path):
    """``build("FX-B")`` builds a fixture inside the data directory and returns its directory name."""

    def _build(name: str) -> str:
        return make(name, data_dir).name

    return _build


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are skipped where CUDA is unavailable (CI): ``bench/gpu.sh`` runs them on a GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu; bench/gpu.sh runs these)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
