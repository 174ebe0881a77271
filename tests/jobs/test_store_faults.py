"""Faults of the job store and the data directory: a full disk is a 507 naming the data directory, an unreachable
store a 503, and neither leaves anything half-written (no scratch directory, no job left queued)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from adapter_surgery.api import uploads
from adapter_surgery.api.app import create_app
from adapter_surgery.jobs import JobService, JobState
from adapter_surgery.settings import Settings
from tests.jobs.helpers import free_port, redis_server, until

SPEC = {"tokens": ["<a>", "<b>"]}
PROBLEM = "application/problem+json"


def client_of(data_dir: Path, **settings: object) -> TestClient:
    return TestClient(create_app(Settings(data_dir=data_dir, heartbeat_seconds=0.2, **settings)),
                      raise_server_exceptions=False)


def jobs_of(client: TestClient) -> JobService:
    return client.app.state.jobs  # type: ignore[attr-defined,no-any-return]


def assert_problem(r, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    return r.json()


@contextlib.contextmanager
def small_volume(where: Path, size: str = "4m") -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root, or no CAP_SYS_ADMIN)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(volume: Path) -> Path:
    """Fill ``volume`` to the last block."""
    filler = volume / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (65536, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


# -- a full disk ------------------------------------------------------------------------------------------------
def test_full_disk_under_the_job_store_is_507(tmp_path: Path) -> None:
    with small_volume(tmp_path / "data") as data_dir:
        client = client_of(data_dir)
        assert client.get("/jobs").status_code == 200  # the store exists, then the volume fills up
        filler = fill(data_dir)
        big = {"tokens": [f"<token-{i:06d}-{'x' * 40}>" for i in range(20000)]}  # a ~1 MB record
        r = client.post("/extend-vocab", json={"checkpoint": "missing", "output": "o", **big},
                        headers={"Prefer": "respond-async"})
        body = assert_problem(r, 507)
        assert body["title"] == "Insufficient storage" and str(data_dir) in body["detail"], body
        assert client.get("/jobs", params={"state": "queued"}).json()["jobs"] == []  # nothing half-written
        filler.unlink()
        r = client.post("/extend-vocab", json={"checkpoint": "missing", "output": "o", **SPEC})
        assert_problem(r, 404)  # the service keeps serving once there is room
        jobs_of(client).stop_workers()


def test_sqlite_disk_full_error_is_507(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client = client_of(data_dir)
    assert client.get("/jobs").status_code == 200
    store = jobs_of(client).store

    def full(*_: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store, "_q", full)
    body = assert_problem(client.post("/extend-vocab", json={"checkpoint": "c", "output": "o", **SPEC}), 507)
    assert body["title"] == "Insufficient storage" and str(data_dir) in body["detail"]


def test_upload_onto_a_full_disk_is_507_and_leaves_no_scratch(tmp_path: Path) -> None:
    with small_volume(tmp_path / "data") as data_dir:
        client = client_of(data_dir, max_upload_bytes=64 << 20)
        assert client.get("/jobs").status_code == 200
        payload = os.urandom(6 << 20)  # more than the 4 MiB volume
        r = client.post("/extend-vocab", files={"file": ("m.safetensors", payload)}, data={"spec": "{}"})
        body = assert_problem(r, 507)
        assert body["field"] == "file" and str(data_dir) in body["detail"]
        root = uploads.scratch_root(data_dir)
        assert not root.exists() or list(root.iterdir()) == []
        jobs_of(client).stop_workers()


@pytest.mark.parametrize("where", ["new_scratch", "flush"])
def test_enospc_while_receiving_is_507_and_leaves_no_scratch(data_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                            where: str) -> None:
    client = client_of(data_dir)

    def no_room(*_: object, **__: object) -> None:
        raise OSError(errno.ENOSPC if where == "flush" else errno.EDQUOT, os.strerror(errno.ENOSPC))

    if where == "new_scratch":
        real = uploads.make_work_dir

        def half(work: Path, *args: object) -> None:
            real(work, *args)  # the directory is made, then its owner record cannot be written
            no_room()

        monkeypatch.setattr(uploads, "make_work_dir", half)
    else:
        monkeypatch.setattr(uploads._FormReceiver, "flush", no_room)
    r = client.post("/extend-vocab", files={"file": ("m.safetensors", b"x" * 1000)}, data={"spec": "{}"})
    assert assert_problem(r, 507)["field"] == "file"
    root = uploads.scratch_root(data_dir)
    assert not root.exists() or list(root.iterdir()) == []


# -- an unreachable store ---------------------------------------------------------------------------------------
def test_unreachable_redis_is_503(data_dir: Path) -> None:
    client = client_of(data_dir, queue_url=f"redis://:secret@127.0.0.1:{free_port()}/0")
    for r in (client.post("/extend-vocab", json={"checkpoint": "c", "output": "o", **SPEC}),
              client.post("/extend-vocab", json={"checkpoint": "c", "output": "o", **SPEC},
                          headers={"Prefer": "respond-async"}),
              client.get("/jobs"), client.get(f"/jobs/{'0' * 32}"), client.delete(f"/jobs/{'0' * 32}")):
        body = assert_problem(r, 503)
        assert body["title"] == "Job store unavailable" and "127.0.0.1" in body["detail"] and body["fix"]
        assert "secret" not in r.text
    r = client.get("/readyz")
    assert r.status_code == 503 and "unreachable" in r.json()["detail"]
    assert client.get("/metrics").status_code == 200  # the request metrics still answer


def test_unusable_sqlite_store_is_503(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client = client_of(data_dir)
    assert client.get("/jobs").status_code == 200
    store = jobs_of(client).store

    def locked(*_: object) -> None:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(store, "_q", locked)
    for r in (client.post("/extend-vocab", json={"checkpoint": "c", "output": "o", **SPEC}), client.get("/jobs"),
              client.get(f"/jobs/{'0' * 32}")):
        assert assert_problem(r, 503)["title"] == "Job store unavailable"
    monkeypatch.undo()
    assert client.get("/jobs").status_code == 200


# -- live workers (Redis) ----------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_readyz_in_redis_mode_needs_a_live_worker(data_dir: Path) -> None:
    with redis_server() as url:
        client = client_of(data_dir, queue_url=url)
        r = client.get("/readyz")
        assert r.status_code == 503 and r.headers["content-type"] == PROBLEM
        assert "no adapter-surgery worker" in r.json()["detail"], r.text
        worker = JobService(Settings(data_dir=data_dir, queue_url=url, heartbeat_seconds=0.2))
        worker.beat()  # what `adapter-surgery worker` does every heartbeat
        r = client.get("/readyz")
        assert r.status_code == 200, r.text
        assert jobs_of(client).store.live_workers() == [worker.identity]
        until(lambda: client.get("/readyz").status_code == 503, 30)  # no beat for 4 intervals: gone
        assert client.get("/jobs").status_code == 200
        job = client.post("/extend-vocab", json={"checkpoint": "c", "output": "o", **SPEC},
                          headers={"Prefer": "respond-async"}).json()
        assert job["state"] == JobState.queued
        # a request that waits for its result would wait for ever: 503 at once, nothing queued (it hung)
        queued = jobs_of(client).store.count(JobState.queued)
        r = client.post("/extend-vocab", json={"checkpoint": "c", "output": "o2", **SPEC})
        problem = assert_problem(r, 503)
        assert problem["title"] == "No worker" and "respond-async" in problem["fix"], problem
        r = client.post("/extend-vocab", files={"file": ("model.safetensors", b"x")},
                        data={"spec": '{"tokens": ["<a>"]}'})
        assert assert_problem(r, 503)["title"] == "No worker"
        assert jobs_of(client).store.count(JobState.queued) == queued


def test_worker_consumer_beats(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``run_consumer`` registers its heartbeat at once and every interval (embedded store here)."""
    service = JobService(Settings(data_dir=data_dir, heartbeat_seconds=0.1))
    beats: list[float] = []
    monkeypatch.setattr(service, "beat", lambda: beats.append(time.monotonic()))

    class Consumer:
        def __init__(self, *_: object, **__: object) -> None: ...

        def run(self) -> None:
            until(lambda: len(beats) >= 3, 30)

    import huey.consumer

    monkeypatch.setattr(huey.consumer, "Consumer", Consumer)
    service.run_consumer()
    assert len(beats) >= 3
    service.stop_workers()
