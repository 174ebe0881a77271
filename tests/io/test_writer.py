"""The streaming writer: byte-exact copies, row patches, index regeneration, atomic outputs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapter_surgery.errors import OutputExists
from adapter_surgery.io import Changes, Checkpoint, NewTensor, RowPatchedTensor, atomic_output, write_checkpoint
from adapter_surgery.io.writer import WrittenFile, describe_files, write_single_file


def _two_shards(root: Path) -> Path:
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    a = {"emb": torch.randn(10, 4, generator=g).bfloat16(),
         "fp8": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn)}
    b = {"w": torch.randn(3, 3, generator=g), "i": torch.arange(5)}
    save_file(a, str(root / "s1.safetensors"), metadata={"format": "pt", "note": "kept"})
    save_file(b, str(root / "s2.safetensors"), metadata={"format": "pt"})
    index = {"metadata": {"total_size": 0}, "weight_map": {**dict.fromkeys(a, "s1.safetensors"),
                                                           **dict.fromkeys(b, "s2.safetensors")}}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    return root


def test_row_patch_copies_untouched_rows_and_appends(tmp_path: Path) -> None:
    ckpt = Checkpoint.open(_two_shards(tmp_path / "in"))
    new_row = torch.full((4,), 7.0).bfloat16()
    appended = torch.full((2, 4), -1.0).bfloat16()
    changes = Changes(replace={"emb": RowPatchedTensor(ckpt.info("emb"), ckpt.path_of("emb"), {3: new_row}, appended)})
    written = write_checkpoint(ckpt, tmp_path / "out", changes)
    s1 = (tmp_path / "out/s1.safetensors").read_bytes()
    assert written["s1.safetensors"] == WrittenFile("s1.safetensors", len(s1), hashlib.sha256(s1).hexdigest())
    # the linked shard is not read: no digest without a cache that knew it
    s2 = (tmp_path / "out/s2.safetensors").stat().st_size
    assert written["s2.safetensors"] == WrittenFile("s2.safetensors", s2, None, linked=True)
    assert (tmp_path / "out/s2.safetensors").stat().st_ino == (tmp_path / "in/s2.safetensors").stat().st_ino
    before, after = load_file(str(tmp_path / "in/s1.safetensors")), load_file(str(tmp_path / "out/s1.safetensors"))
    assert after["emb"].shape == (12, 4) and after["emb"].dtype == torch.bfloat16
    assert torch.equal(after["emb"][:3], before["emb"][:3]) and torch.equal(after["emb"][4:10], before["emb"][4:10])
    assert torch.equal(after["emb"][3], new_row) and torch.equal(after["emb"][10:], appended)
    # fp8 passes through untouched, byte for byte
    assert after["fp8"].dtype == torch.float8_e4m3fn
    assert torch.equal(after["fp8"].view(torch.uint8), before["fp8"].view(torch.uint8))
    with safe_open(str(tmp_path / "out/s1.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "kept"}
    # the untouched shard is the same bytes (hard link on one filesystem)
    assert (tmp_path / "out/s2.safetensors").read_bytes() == (tmp_path / "in/s2.safetensors").read_bytes()
    index = json.loads((tmp_path / "out/model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"emb": "s1.safetensors", "fp8": "s1.safetensors", "w": "s2.safetensors",
                                   "i": "s2.safetensors"}
    assert index["metadata"]["total_size"] == 12 * 4 * 2 + 16 + 9 * 4 + 5 * 8


def test_add_and_remove_tensors(tmp_path: Path) -> None:
    ckpt = Checkpoint.open(_two_shards(tmp_path / "in"))
    changes = Changes(add={"new": (NewTensor(torch.ones(2, 2, dtype=torch.float16)), "w")}, remove={"i"})
    write_checkpoint(ckpt, tmp_path / "out", changes)
    out = load_file(str(tmp_path / "out/s2.safetensors"))
    assert set(out) == {"w", "new"} and out["new"].dtype == torch.float16
    index = json.loads((tmp_path / "out/model.safetensors.index.json").read_text())
    assert "i" not in index["weight_map"] and index["weight_map"]["new"] == "s2.safetensors"


def test_single_file(tmp_path: Path) -> None:
    save_file({"x": torch.arange(6, dtype=torch.float32).reshape(3, 2)}, str(tmp_path / "m.safetensors"))
    ckpt = Checkpoint.open(tmp_path / "m.safetensors")
    info = ckpt.info("x")
    write_single_file(ckpt, tmp_path / "o.safetensors",
                      Changes(replace={"x": RowPatchedTensor(info, ckpt.path_of("x"), {}, torch.zeros(1, 2))}))
    assert load_file(str(tmp_path / "o.safetensors"))["x"].tolist() == [[0, 1], [2, 3], [4, 5], [0, 0]]


def test_outputs_are_readable_by_the_group_and_links_keep_their_mode(tmp_path: Path) -> None:
    src = tmp_path / "input.bin"
    src.write_bytes(b"x")
    src.chmod(0o600)
    with atomic_output(tmp_path / "out") as tmp:
        tmp.mkdir()
        save_file({"a": torch.zeros(1)}, str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_model.safetensors").chmod(0o600)
        os.link(src, tmp / "linked.bin")
    assert (tmp_path / "out" / "adapter_model.safetensors").stat().st_mode & 0o044 == 0o044
    assert src.stat().st_mode & 0o777 == 0o600


def test_atomic_output_leaves_nothing_on_error(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_output(dest) as tmp:
        tmp.mkdir()
        (tmp / "half").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_output(dest) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("1")
    with pytest.raises(OutputExists), atomic_output(dest) as tmp:
        pass
    with atomic_output(dest, overwrite=True) as tmp:
        tmp.mkdir()
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in dest.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(RuntimeError), atomic_output(tmp_path / "new" / "deeper" / "out") as tmp:
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_concurrent_outputs_never_replace_each_other(tmp_path: Path) -> None:
    import threading

    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def job(i: int, dest: Path, as_dir: bool) -> None:
        try:
            with atomic_output(dest) as tmp:
                if as_dir:
                    tmp.mkdir()
                    (tmp / "who").write_text(str(i))
                else:
                    tmp.write_text(str(i))
                barrier.wait()  # every job has passed the early existence check
            outcomes.append("ok")
        except OutputExists:
            outcomes.append("exists")

    for as_dir, name in ((True, "dir"), (False, "file.safetensors")):
        outcomes.clear()
        barrier.reset()
        threads = [threading.Thread(target=job, args=(i, tmp_path / name, as_dir)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes) == ["exists", "exists", "exists", "ok"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file.safetensors"]


def test_overwrite_keeps_the_kind(tmp_path: Path) -> None:
    from adapter_surgery.errors import InvalidSpec

    (tmp_path / "vocab.txt").write_text("keep me")
    with pytest.raises(InvalidSpec, match="is a file"), atomic_output(tmp_path / "vocab.txt", overwrite=True) as tmp:
        tmp.mkdir()
    assert (tmp_path / "vocab.txt").read_text() == "keep me"


def test_digest_cache_hashes_an_unchanged_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import adapter_surgery.io.writer as writer

    calls: list[Path] = []
    real = writer._sha256
    monkeypatch.setattr(writer, "_sha256", lambda p: calls.append(p) or real(p))
    f = tmp_path / "shard.safetensors"
    f.write_bytes(b"abc")
    cache = writer.DigestCache()
    first, second = cache.sha256(f), cache.sha256(f)
    assert first == second == hashlib.sha256(b"abc").hexdigest() and len(calls) == 1
    f.write_bytes(b"abd")  # rewritten: new mtime, new digest
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1))
    assert cache.sha256(f) == hashlib.sha256(b"abd").hexdigest() and len(calls) == 2


def test_digests_of_linked_shards_come_from_the_cache_never_from_reading(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import adapter_surgery.io.writer as writer

    read: list[str] = []
    real, follow = writer._sha256, writer.HashFollower.run
    monkeypatch.setattr(writer, "_sha256", lambda p: read.append(p.name) or real(p))
    monkeypatch.setattr(writer.HashFollower, "run", lambda self: read.append(self.path.name) or follow(self))
    ckpt = Checkpoint.open(_two_shards(tmp_path / "in"))
    cache = writer.DigestCache()
    emb = ckpt.info("emb")
    changes = Changes(replace={"emb": RowPatchedTensor(emb, ckpt.path_of("emb"), {0: torch.zeros(4).bfloat16()})})
    first = write_checkpoint(ckpt, tmp_path / "a", changes, cache=cache)
    assert read == ["s1.safetensors"] and first["s2.safetensors"].sha256 is None  # only what was written is read
    # a request on that output: s1 is now linked (its digest cached when written), s2 rewritten
    out = Checkpoint.open(tmp_path / "a")
    w = out.info("w")
    second = write_checkpoint(out, tmp_path / "b", Changes(replace={"w": RowPatchedTensor(w, out.path_of("w"))}),
                              cache=cache)
    assert read == ["s1.safetensors", "s2.safetensors"]
    assert second["s1.safetensors"] == dataclasses.replace(first["s1.safetensors"], linked=True)
    assert second["s2.safetensors"].sha256 == hashlib.sha256((tmp_path / "b/s2.safetensors").read_bytes()).hexdigest()
    # describe_files reads only the files it is not told about
    (tmp_path / "b/config.json").write_text("{}")
    files = {f.path: f for f in describe_files(tmp_path / "b", known=second)}
    assert read[2:] == ["config.json"] and files["s1.safetensors"] == second["s1.safetensors"]
    assert files["config.json"].sha256 == hashlib.sha256(b"{}").hexdigest() and not files["config.json"].linked


def test_a_shard_is_hashed_while_it_is_written(tmp_path: Path) -> None:
    """The follower's digest is the written file's, tensor after tensor; a failed write stops it instead of
    leaving it waiting."""
    import threading

    from adapter_surgery.io.writer import HashFollower, write_shard

    g = torch.Generator().manual_seed(1)
    entries = [(f"t{i}", NewTensor(torch.randn(1000 + i, 37, generator=g))) for i in range(5)]
    follower = HashFollower(tmp_path / "a.safetensors")
    digests: list[str] = []
    worker = threading.Thread(target=lambda: digests.append(follower.run()))
    worker.start()
    write_shard(tmp_path / "a.safetensors", entries, {"format": "pt"}, follower=follower, sync=False)
    worker.join(timeout=30)
    assert digests == [hashlib.sha256((tmp_path / "a.safetensors").read_bytes()).hexdigest()]
    assert torch.equal(load_file(str(tmp_path / "a.safetensors"))["t3"], entries[3][1].tensor)

    class Broken(NewTensor):
        def write(self, fd: int) -> None:
            raise OSError("disk full")

    failed = HashFollower(tmp_path / "b.safetensors")
    errors: list[BaseException] = []

    def follow() -> None:
        try:
            failed.run()
        except OSError as exc:
            errors.append(exc)

    worker = threading.Thread(target=follow)
    worker.start()
    with pytest.raises(OSError, match="disk full"):
        write_shard(tmp_path / "b.safetensors", [entries[0], ("bad", Broken(torch.zeros(2)))], None, follower=failed)
    worker.join(timeout=30)
    assert not worker.is_alive() and "abandoned" in str(errors[0])


def _patched_emb(ckpt: Checkpoint) -> RowPatchedTensor:
    return RowPatchedTensor(ckpt.info("emb"), ckpt.path_of("emb"), {6: torch.full((4,), 7.0).bfloat16()},
                            torch.full((2, 4), -1.0).bfloat16())


@pytest.mark.parametrize("failure", ["EXDEV", "ENOSYS", "EOPNOTSUPP", "after-a-partial-copy"])
def test_a_copy_the_kernel_refuses_falls_back_to_reading_and_writing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    """``copy_file_range`` unsupported between two files (another filesystem, an old kernel, a filesystem without
    it), or failing midway: the rest is copied through a bounded read/write loop, same bytes, same digest."""
    import errno

    from adapter_surgery.io import writer

    ckpt = Checkpoint.open(_two_shards(tmp_path / "in"))
    expected = write_checkpoint(ckpt, tmp_path / "kernel", Changes(replace={"emb": _patched_emb(ckpt)}))
    real, calls = os.copy_file_range, []

    def refuse(src: int, dst: int, count: int, offset_src: int | None = None, *args: object) -> int:
        calls.append(count)
        if failure == "after-a-partial-copy" and len(calls) == 1:
            return real(src, dst, min(count, 5), offset_src)  # some bytes, then the failure
        code = errno.EXDEV if failure == "after-a-partial-copy" else getattr(errno, failure)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(writer.os, "copy_file_range", refuse)
    monkeypatch.setattr(writer, "COPY_CHUNK", 3)  # several rounds of the read/write loop
    got = write_checkpoint(ckpt, tmp_path / "loop", Changes(replace={"emb": _patched_emb(ckpt)}))
    assert calls and got == expected
    for name in ("s1.safetensors", "s2.safetensors"):
        assert (tmp_path / "loop" / name).read_bytes() == (tmp_path / "kernel" / name).read_bytes()
    assert got["s1.safetensors"].sha256 == hashlib.sha256((tmp_path / "loop/s1.safetensors").read_bytes()).hexdigest()


def test_deferred_rows_copy_the_ready_rows_before_the_patch_is_resolved(tmp_path: Path) -> None:
    """A :class:`DeferredRows` writes exactly the bytes of the patch it resolves to; its ready rows are in the file
    when ``resolve`` is called (the copy overlaps the computation); the digest is the file's."""
    from adapter_surgery.io.writer import DeferredRows

    ckpt = Checkpoint.open(_two_shards(tmp_path / "in"))
    expected = write_checkpoint(ckpt, tmp_path / "direct", Changes(replace={"emb": _patched_emb(ckpt)}))
    info, out = ckpt.info("emb"), tmp_path / "deferred"
    seen: list[int] = []

    def resolve() -> RowPatchedTensor:
        seen.append((out / "s1.safetensors").stat().st_size)
        return _patched_emb(ckpt)

    deferred = DeferredRows(info, ckpt.path_of("emb"), (12, 4), 6, resolve)
    assert (deferred.dtype, deferred.nbytes) == ("BF16", 12 * 4 * 2)
    got = write_checkpoint(ckpt, out, Changes(replace={"emb": deferred}))
    assert got == expected
    assert (out / "s1.safetensors").read_bytes() == (tmp_path / "direct/s1.safetensors").read_bytes()
    # when resolve ran, the file held everything before emb and emb's 6 ready rows
    assert seen == [Checkpoint.open(out).info("emb").begin + 6 * 4 * 2]


def test_deferred_rows_refuse_a_patch_that_does_not_fit_and_pass_errors_on(tmp_path: Path) -> None:
    from adapter_surgery.io.writer import DeferredRows

    ckpt = Checkpoint.open(_two_shards(tmp_path / "in"))
    info, path = ckpt.info("emb"), ckpt.path_of("emb")
    early = DeferredRows(info, path, (12, 4), 7, lambda: _patched_emb(ckpt))  # the override (row 6) is before 7
    with pytest.raises(RuntimeError, match="before row 7"), atomic_output(tmp_path / "a") as tmp:
        write_checkpoint(ckpt, tmp, Changes(replace={"emb": early}))
    wrong = DeferredRows(info, path, (13, 4), 6, lambda: _patched_emb(ckpt))
    with pytest.raises(RuntimeError, match="do not match"), atomic_output(tmp_path / "b") as tmp:
        write_checkpoint(ckpt, tmp, Changes(replace={"emb": wrong}))

    def fail() -> RowPatchedTensor:
        raise ValueError("no trained rows")

    with pytest.raises(ValueError, match="no trained rows"), atomic_output(tmp_path / "c") as tmp:
        write_checkpoint(ckpt, tmp, Changes(replace={"emb": DeferredRows(info, path, (12, 4), 6, fail)}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # nothing half-written is left


def test_a_rewritten_shard_is_written_back_while_it_is_written_then_fsynced_complete(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SyncFollower: ``fdatasync`` each SYNC_STEP bytes made final during the write, one ``fsync`` of the complete
    file, and write_checkpoint returns only after it (the caller's rename publishes durable shards)."""
    from adapter_surgery.io import writer

    ckpt = Checkpoint.open(_two_shards(tmp_path / "in"))
    out = tmp_path / "out"
    calls: list[tuple[str, int]] = []

    monkeypatch.setattr(writer, "SYNC_STEP", 16)
    import threading

    synced = threading.Event()

    def sized(kind: str, real):  # the file's size when each sync starts
        def run(fd: int) -> None:
            calls.append((kind, os.fstat(fd).st_size))
            real(fd)
            synced.set()
        return run

    monkeypatch.setattr(writer.os, "fdatasync", sized("fdatasync", os.fdatasync))
    monkeypatch.setattr(writer.os, "fsync", sized("fsync", os.fsync))

    class Waiting(NewTensor):  # the next tensor is written once the bytes so far are being written back
        def write(self, fd: int) -> None:
            assert synced.wait(timeout=30)
            synced.clear()
            super().write(fd)

    g = torch.Generator().manual_seed(2)
    rows = {f"r{i}": (Waiting(torch.randn(3, 4, generator=g)), "w") for i in range(4)}
    synced.set()
    written = write_checkpoint(ckpt, out, Changes(add=rows))
    size = (out / "s2.safetensors").stat().st_size
    assert calls[-1] == ("fsync", size) and [k for k, _ in calls].count("fsync") == 1
    during = [n for k, n in calls if k == "fdatasync"]
    assert len(during) >= 3 and during == sorted(during) and during[0] < size  # the first ones before the end
    assert written["s2.safetensors"].sha256 == hashlib.sha256((out / "s2.safetensors").read_bytes()).hexdigest()

    follower = writer.SyncFollower(out / "s2.safetensors")
    follower.abandon()
    with pytest.raises(OSError, match="abandoned"):
        follower.run()
