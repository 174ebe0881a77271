"""Jobs across processes: ``kill -9`` of the server mid-write, and Redis with two ``adapter-surgery worker``s."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from adapter_surgery.api.app import create_app
from adapter_surgery.ops.common import RunContext
from adapter_surgery.ops.extend_vocab import ExtendVocabSpec, extend_vocab
from adapter_surgery.settings import Settings
from tests.conftest import tree_digest
from tests.jobs.helpers import free_port, redis_server, temporaries, until

ROOT = Path(__file__).resolve().parents[2]
SPEC = {"tokens": ["<a>", "<b>"]}


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    full = {**os.environ, "PYTHONPATH": f"{ROOT / 'service'}:{ROOT}", "TQDM_DISABLE": "1", **env}
    return subprocess.Popen([sys.executable, "-m", "tests.jobs.slow_main", *args], cwd=ROOT, env=full,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)


def serve(data_dir: Path, port: int, log: Path, delay: str = "0.3") -> subprocess.Popen[bytes]:
    proc = spawn(["serve", "--data-dir", str(data_dir), "--port", str(port)],
                 {"ADAPTER_SURGERY_TEST_TENSOR_DELAY": delay, "ADAPTER_SURGERY_HEARTBEAT_SECONDS": "0.5"}, log)

    def up() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    until(up, 180)
    return proc


def reference(data_dir: Path, src: str, name: str) -> dict[str, str]:
    """The output of the same request run directly, for byte comparison."""
    extend_vocab(ExtendVocabSpec(checkpoint=src, output=name, **SPEC), RunContext(data_dir))
    digest = tree_digest(data_dir / name)
    shutil.rmtree(data_dir / name)
    return digest


def test_kill_9_of_the_server_mid_write_leaves_nothing(data_dir: Path, build, tmp_path: Path) -> None:
    src = build("FX-B")
    before = tree_digest(data_dir / src)
    port = free_port()
    proc = serve(data_dir, port, tmp_path / "serve1.log")
    base = f"http://127.0.0.1:{port}"
    try:
        r = httpx.post(f"{base}/extend-vocab", json={"checkpoint": src, "output": "out", **SPEC},
                       headers={"Prefer": "respond-async"})
        assert r.status_code == 202, r.text
        job = r.json()["id"]
        until(lambda: httpx.get(f"{base}/jobs/{job}").json()["progress"]["done"] > 0)  # tensors being written
        assert temporaries(data_dir)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (data_dir / "out").exists()
    proc = serve(data_dir, port, tmp_path / "serve2.log")
    try:
        after = httpx.get(f"{base}/jobs/{job}").json()
        assert after["state"] == "failed" and after["problem"]["title"] == "Worker died", after
        assert not (data_dir / "out").exists() and temporaries(data_dir) == []
        assert tree_digest(data_dir / src) == before
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_redis_two_workers(data_dir: Path, build, tmp_path: Path) -> None:
    src = build("FX-B")
    expected = reference(data_dir, src, "ref")
    before = tree_digest(data_dir / src)
    stack = contextlib.ExitStack()
    url = stack.enter_context(redis_server())
    env = {"ADAPTER_SURGERY_QUEUE_URL": url, "ADAPTER_SURGERY_HEARTBEAT_SECONDS": "0.5",
           "ADAPTER_SURGERY_TEST_TENSOR_DELAY": "0.05"}
    workers = [spawn(["worker", "--data-dir", str(data_dir), "--workers", "1"], env, tmp_path / f"w{i}.log")
               for i in range(2)]
    try:
        client = TestClient(create_app(Settings(data_dir=data_dir, queue_url=url, heartbeat_seconds=0.5)))
        ids = [client.post("/extend-vocab", json={"checkpoint": src, "output": f"out{i}", **SPEC},
                           headers={"Prefer": "respond-async"}).json()["id"] for i in range(4)]

        def all_done() -> bool:
            return all(client.get(f"/jobs/{i}").json()["state"] in ("succeeded", "failed") for i in ids)

        until(all_done, 300)
        jobs = [client.get(f"/jobs/{i}").json() for i in ids]
        assert [j["state"] for j in jobs] == ["succeeded"] * 4, jobs
        assert len({j["worker"] for j in jobs}) == 2  # spread over both workers
        assert {j["worker"].split(":")[1] for j in jobs} == {str(w.pid) for w in workers}
        assert all(j["progress"]["fraction"] == 1 and j["progress"]["total"] > 0 for j in jobs)
        for i in range(4):
            assert tree_digest(data_dir / f"out{i}") == expected
        # a sync request answers through the queue as before
        sync = client.post("/extend-vocab", json={"checkpoint": src, "output": "sync", **SPEC})
        assert sync.status_code == 200 and tree_digest(data_dir / "sync") == expected

        # kill -9 of the worker running a job (its progress visible through the API): nothing at the destination,
        # the job ends failed
        r = client.post("/extend-vocab", json={"checkpoint": src, "output": "killed", **SPEC},
                        headers={"Prefer": "respond-async"})
        job = r.json()["id"]
        running = until(lambda: (j := client.get(f"/jobs/{job}").json())["progress"]["done"] > 0 and j)
        assert isinstance(running, dict) and running["state"] == "running"
        victim = next(w for w in workers if str(w.pid) == running["worker"].split(":")[1])
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        until(lambda: client.get(f"/jobs/{job}").json()["state"] == "failed", 120)
        assert client.get(f"/jobs/{job}").json()["problem"]["title"] == "Worker died"
        until(lambda: temporaries(data_dir) == [], 120)  # the surviving worker swept them
        assert not (data_dir / "killed").exists()
        assert tree_digest(data_dir / src) == before
    finally:
        for w in workers:
            if w.poll() is None:
                w.terminate()
        for w in workers:
            w.wait(30)
        stack.close()
