"""The planned writer (:class:`adapter_surgery.io.planned.PlannedFile`): the bytes and digest of ``save_file``
whatever order the tensors come in, zero tensors as holes, and failures (a full disk on the worker thread, the
caller's own error, a tensor never handed over) that leave no file, no open descriptor and no thread."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import adapter_surgery.io.planned as planned
from adapter_surgery.io.header import TORCH_TO_SAFETENSORS
from adapter_surgery.io.layout import layout
from adapter_surgery.io.planned import PlannedFile
from tests.conftest import full_disk_at_pwrite


def _tensors() -> dict[str, torch.Tensor]:
    """Drawn tensors and zero ones, interleaved in file order; some larger than the hashing chunk."""
    g = torch.Generator().manual_seed(1)
    out = {}
    for i in (0, 1, 2, 10, 11):
        out[f"l.{i}.a"] = torch.randn(3, 1000 + i, generator=g)
        out[f"l.{i}.b"] = torch.zeros(700 * (i + 1), 3)
    out["l.big.a"] = torch.randn(2, planned.CHUNK // 4 + 13, generator=g)
    out["l.big.b"] = torch.zeros(3, planned.CHUNK // 4 + 5)
    return out


def _plan(tensors: dict[str, torch.Tensor]):
    return layout([(n, TORCH_TO_SAFETENSORS[t.dtype], tuple(t.shape)) for n, t in tensors.items()], {"format": "pt"})


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("order", ["file", "reversed", "shuffled"])
def test_bytes_and_digest_are_save_files(tmp_path: Path, order: str) -> None:
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    ref = (tmp_path / "ref.safetensors").read_bytes()
    plan = _plan(tensors)
    drawn = [t.name for t in plan.tensors if not t.name.endswith(".b")]
    if order == "reversed":
        drawn.reverse()
    elif order == "shuffled":
        drawn = [drawn[i] for i in torch.randperm(len(drawn), generator=torch.Generator().manual_seed(3))]
    zeros = {n for n in tensors if n.endswith(".b")}
    with PlannedFile(tmp_path / "out.safetensors", plan, zeros) as out:
        for name in drawn:
            out.put(name, tensors[name])
        written = out.finish()
    assert (tmp_path / "out.safetensors").read_bytes() == ref
    assert (written.path, written.bytes, written.sha256) == ("out.safetensors", len(ref),
                                                             hashlib.sha256(ref).hexdigest())


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files in /proc")
@pytest.mark.parametrize("failing", [1, 3, 6])
def test_a_full_disk_on_the_worker_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  failing: int) -> None:
    """ENOSPC from the worker's k-th write (the header's is the first, on the caller's thread): the error reaches
    the caller (at a later put, or at finish), the file is removed, its descriptor closed, the worker ended."""
    tensors = _tensors()
    plan = _plan(tensors)
    calls = full_disk_at_pwrite(monkeypatch, failing)
    threads, fds = set(threading.enumerate()), _open_fds()
    with pytest.raises(OSError) as caught, PlannedFile(tmp_path / "out", plan, set()) as out:
        for t in plan.tensors:
            out.put(t.name, tensors[t.name])
        out.finish()
    assert caught.value.errno == errno.ENOSPC and len(calls) == failing
    assert list(tmp_path.iterdir()) == [] and _open_fds() == fds and set(threading.enumerate()) <= threads


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files in /proc")
def test_the_callers_error_stops_the_worker_and_removes_the_file(tmp_path: Path) -> None:
    """A cancel (any exception) in the caller's block while writes are in flight: the worker ends, the file goes."""
    tensors = _tensors()
    plan = _plan(tensors)
    threads, fds = set(threading.enumerate()), _open_fds()
    with pytest.raises(KeyboardInterrupt), PlannedFile(tmp_path / "out", plan, set()) as out:
        for t in plan.tensors[:5]:
            out.put(t.name, tensors[t.name])
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == [] and _open_fds() == fds and set(threading.enumerate()) <= threads


def test_a_tensor_never_handed_over_or_of_another_size_is_refused(tmp_path: Path) -> None:
    tensors = _tensors()
    plan = _plan(tensors)
    zeros = {n for n in tensors if n.endswith(".b")}
    out_path = tmp_path / "out"
    with pytest.raises(RuntimeError, match=r"never written: l\.0\.a"), PlannedFile(out_path, plan, zeros) as out:
        out.put("l.1.a", tensors["l.1.a"])
        out.finish()
    with pytest.raises(ValueError, match="has 12 bytes"), PlannedFile(tmp_path / "out", plan, zeros) as out:
        out.put("l.0.a", torch.zeros(3))
    with pytest.raises(ValueError, match="not a tensor to write"), PlannedFile(tmp_path / "out", plan, zeros) as out:
        out.put("l.0.b", tensors["l.0.b"])
    assert list(tmp_path.iterdir()) == []


def test_an_existing_file_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "out").write_bytes(b"kept")
    with pytest.raises(FileExistsError):
        PlannedFile(tmp_path / "out", _plan(_tensors()), set())
    assert (tmp_path / "out").read_bytes() == b"kept"


def test_the_bytes_in_flight_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the worker held in its first write, the caller hands over tensors up to ``IN_FLIGHT`` bytes and then
    waits (memory does not grow with the file); once the worker goes on, everything is written as planned."""
    tensors = {f"t{i}": torch.full((1000,), float(i)) for i in range(6)}  # 4000 bytes each
    plan = _plan(tensors)
    monkeypatch.setattr(planned, "IN_FLIGHT", 8000)
    gate, real = threading.Event(), os.pwrite

    def pwrite(fd: int, data, at: int) -> int:
        if at > 0:  # a tensor's bytes (the header is written at 0)
            gate.wait()
        return real(fd, data, at)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with PlannedFile(tmp_path / "out", plan, set()) as out:
        out.put("t0", tensors["t0"])
        out.put("t1", tensors["t1"])
        third = threading.Thread(target=out.put, args=("t2", tensors["t2"]))
        third.start()
        third.join(timeout=0.5)
        held = third.is_alive()
        gate.set()
        third.join()
        for name in ("t3", "t4", "t5"):
            out.put(name, tensors[name])
        written = out.finish()
    assert held, "the third tensor was taken past the budget of two"
    save_file(tensors, str(tmp_path / "ref"), metadata={"format": "pt"})
    assert (tmp_path / "out").read_bytes() == (tmp_path / "ref").read_bytes()
    assert written.sha256 == hashlib.sha256((tmp_path / "ref").read_bytes()).hexdigest()
