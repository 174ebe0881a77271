"""The job service in one process: lifecycle through the API, progress, listing, cancel, the bounded queue, restart
recovery and the start-up sweep, a full disk, and many jobs at once."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from adapter_surgery.api.app import create_app
from adapter_surgery.io.atomic import OWNER_FILE, owner_record
from adapter_surgery.jobs import Job, JobRecord, JobService, JobState
from adapter_surgery.settings import Settings
from tests.conftest import tensors, tree_digest
from tests.jobs.helpers import Gate, finished, release_when_cancelled, temporaries, until

SPEC = {"tokens": ["<a>", "<b>"]}


def make_client(data_dir: Path, **settings: object) -> TestClient:
    return TestClient(create_app(Settings(data_dir=data_dir, heartbeat_seconds=0.2, **settings)),
                      raise_server_exceptions=False)


def jobs_of(client: TestClient) -> JobService:
    return client.app.state.jobs  # type: ignore[attr-defined,no-any-return]


def test_sync_and_async_give_the_same_result(data_dir: Path, build) -> None:
    client = make_client(data_dir)
    src = build("FX-B")
    sync = client.post("/extend-vocab", json={"checkpoint": src, "output": "sync", **SPEC})
    assert sync.status_code == 200, sync.text
    r = client.post("/extend-vocab", json={"checkpoint": src, "output": "async", **SPEC},
                    headers={"Prefer": "respond-async"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/jobs/{job['id']}" and r.headers["preference-applied"] == "respond-async"
    assert job["operation"] == "extend-vocab" and job["state"] in ("queued", "running")
    until(lambda: client.get(f"/jobs/{job['id']}").json()["state"] == "succeeded")
    done = client.get(f"/jobs/{job['id']}").json()
    assert done["result"]["vocab_size_after"] == sync.json()["vocab_size_after"] == 130
    assert [f["sha256"] for f in done["result"]["files"]] == [f["sha256"] for f in sync.json()["files"]]
    assert done["problem"] is None and done["started_at"] and done["finished_at"] >= done["started_at"]
    p = done["progress"]
    assert p["fraction"] == 1.0 and p["unit"] == "bytes" and p["done"] == p["total"]
    assert p["total"] >= (data_dir / src / "model-00001-of-00002.safetensors").stat().st_size - 4096
    listed = client.get("/jobs").json()["jobs"]
    assert listed[0]["id"] == job["id"] and len(listed) == 2  # newest first, the sync one too
    assert tree_digest(data_dir / "sync") == tree_digest(data_dir / "async")


def test_sync_problem_is_the_jobs_problem(data_dir: Path, build) -> None:
    client = make_client(data_dir)
    r = client.post("/extend-vocab", json={"checkpoint": "missing", "output": "o", **SPEC})
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    (job,) = client.get("/jobs", params={"state": "failed"}).json()["jobs"]
    assert job["problem"] == r.json() and job["result"] is None
    r = client.post("/extend-vocab", json={"checkpoint": "missing", "output": "o", **SPEC},
                    headers={"Prefer": "respond-async"})
    assert r.status_code == 202
    until(lambda: client.get(r.headers["location"]).json()["state"] == "failed")
    assert client.get(r.headers["location"]).json()["problem"]["status"] == 404


def test_progress_while_running(data_dir: Path, build, gate: Gate) -> None:
    client = make_client(data_dir)
    src = build("FX-B")
    events = []
    r = client.post("/extend-vocab", json={"checkpoint": src, "output": "o", **SPEC},
                    headers={"Prefer": "respond-async"})
    job_id = r.json()["id"]
    gate.reached.wait(20)
    until(lambda: client.get(f"/jobs/{job_id}").json()["progress"]["total"] > 0)
    running = client.get(f"/jobs/{job_id}").json()
    events.append(running["progress"])
    assert running["state"] == "running" and running["worker"].endswith(f":{os.getpid()}")
    assert running["progress"]["stage"].startswith("rewriting") and running["progress"]["fraction"] < 1
    gate.release()
    until(lambda: finished(jobs_of(client), job_id))
    assert client.get(f"/jobs/{job_id}").json()["progress"]["fraction"] == 1.0


def test_list_pagination_and_state_filter(data_dir: Path, build) -> None:
    client = make_client(data_dir)
    src = build("FX-A")
    ids = []
    for i in range(5):
        r = client.post("/extend-vocab", json={"checkpoint": src, "output": f"o{i}", **SPEC},
                        headers={"Prefer": "respond-async"})
        ids.append(r.json()["id"])
    r = client.post("/extend-vocab", json={"checkpoint": src, "output": "o0", **SPEC})
    assert r.status_code == 409  # the output exists: a failed job
    for i in ids:
        until(lambda i=i: finished(jobs_of(client), i))
    seen, cursor = [], None
    while True:
        page = client.get("/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        assert len(page["jobs"]) <= 2
        seen += page["jobs"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 6 and len({j["id"] for j in seen}) == 6
    assert [j["created_at"] for j in seen] == sorted((j["created_at"] for j in seen), reverse=True)
    assert [j["id"] for j in seen[1:]] == ids[::-1]
    failed = client.get("/jobs", params={"state": "failed"}).json()["jobs"]
    assert len(failed) == 1 and failed[0]["problem"]["status"] == 409
    assert len(client.get("/jobs", params={"state": "succeeded"}).json()["jobs"]) == 5
    assert client.get("/jobs", params={"state": "nope"}).status_code == 422
    assert client.get("/jobs", params={"cursor": "garbage"}).json()["field"] == "cursor"
    assert client.get(f"/jobs/{uuid.uuid4().hex}").status_code == 404


def test_cancel_mid_job_leaves_nothing(data_dir: Path, build, gate: Gate) -> None:
    client = make_client(data_dir)
    src = build("FX-B")
    before = tree_digest(data_dir / src)
    r = client.post("/extend-vocab", json={"checkpoint": src, "output": "deep/o", **SPEC},
                    headers={"Prefer": "respond-async"})
    job_id = r.json()["id"]
    assert gate.reached.wait(20)
    assert temporaries(data_dir)  # the job is writing its temporary output
    release_when_cancelled(jobs_of(client), job_id, gate)
    d = client.delete(f"/jobs/{job_id}")
    assert d.status_code == 200 and d.json()["state"] == "cancelled", d.text
    assert d.json()["problem"]["status"] == 409 and d.json()["cancel_requested"] is True
    assert not (data_dir / "deep").exists() and temporaries(data_dir) == []
    assert tree_digest(data_dir / src) == before
    assert client.delete(f"/jobs/{job_id}").json()["state"] == "cancelled"  # finished: unchanged


def test_client_disconnect_cancels_a_sync_request(data_dir: Path, build, gate: Gate) -> None:
    import asyncio

    from adapter_surgery.api.jobs import await_job

    client = make_client(data_dir)
    jobs = jobs_of(client)
    src = build("FX-B")
    job = jobs.submit("extend-vocab", {"checkpoint": src, "output": "o", **SPEC})
    assert gate.reached.wait(20)

    class Gone:
        async def is_disconnected(self) -> bool:
            return True

    release_when_cancelled(jobs, job.id, gate)
    ended = asyncio.run(await_job(jobs, job.id, Gone()))  # type: ignore[arg-type]
    assert ended.state == JobState.cancelled
    assert not (data_dir / "o").exists() and temporaries(data_dir) == []


def test_full_queue_answers_429_with_retry_after(data_dir: Path, build, gate: Gate) -> None:
    client = make_client(data_dir, workers=1, max_queue=1)
    src = build("FX-B")
    body = {"checkpoint": src, **SPEC}
    a = client.post("/extend-vocab", json={**body, "output": "a"}, headers={"Prefer": "respond-async"}).json()
    assert gate.reached.wait(20)
    b = client.post("/extend-vocab", json={**body, "output": "b"}, headers={"Prefer": "respond-async"})
    assert b.status_code == 202 and b.json()["state"] == "queued"
    c = client.post("/extend-vocab", json={**body, "output": "c"})
    assert c.status_code == 429 and int(c.headers["retry-after"]) >= 1
    assert c.headers["content-type"] == "application/problem+json" and c.json()["title"] == "Too many jobs"
    assert client.delete(f"/jobs/{b.json()['id']}").json()["state"] == "cancelled"  # queued: revoked at once
    gate.release()
    until(lambda: finished(jobs_of(client), a["id"]))
    assert client.get(f"/jobs/{a['id']}").json()["state"] == "succeeded"
    assert client.get(f"/jobs/{b.json()['id']}").json()["state"] == "cancelled"
    assert (data_dir / "a").is_dir() and not (data_dir / "b").exists() and not (data_dir / "c").exists()


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_restart_fails_dead_jobs_and_sweeps_their_temporaries(data_dir: Path, build) -> None:
    src = build("FX-B")
    settings = Settings(data_dir=data_dir, heartbeat_seconds=0.2)
    old = JobService(settings)
    rec = JobRecord(job=Job(id=uuid.uuid4().hex, operation="extend-vocab", state=JobState.running,
                            created_at=datetime.now(UTC)),
                    spec={"checkpoint": src, "output": "out/x"}, host=os.uname().nodename, pid=_dead_pid(),
                    heartbeat=time.time())
    old.store.insert(rec)
    dead_owner = {**owner_record(rec.job.id), "pid": rec.pid}
    (data_dir / "out").mkdir()
    tmp = data_dir / "out" / ".x.tmp-0123456789ab"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"partial")
    tmp.with_name(tmp.name + ".owner").write_text(json.dumps(dead_owner))
    work = data_dir / "out" / ".x.surgery-0123456789ab"
    work.mkdir()
    (work / OWNER_FILE).write_text(json.dumps(dead_owner))
    # a temporary of a live owner (this process, a job that is running here) and one with no record yet: kept
    live = data_dir / ".y.tmp-abcdefabcdef"
    live.mkdir()
    live.with_name(live.name + ".owner").write_text(json.dumps(owner_record(None)))
    unowned = data_dir / ".z.tmp-abcdefabcdef"
    unowned.write_bytes(b"fresh")
    # an overwrite interrupted between its renames: the previous output is restored
    aside = data_dir / ".prev.old-0123456789ab"
    aside.mkdir()
    (aside / "config.json").write_text("{}")
    (data_dir / ".prev.tmp-0123456789ab.owner").write_text(json.dumps(dead_owner))
    scratch = data_dir / ".adapter-surgery" / "scratch" / "deadbeef"
    scratch.mkdir(parents=True)
    (scratch / OWNER_FILE).write_text(json.dumps({**owner_record(None), "pid": _dead_pid()}))
    old.stop_workers()

    fresh = JobService(settings)
    fresh.start()
    after = fresh.get(rec.job.id)
    assert after.state == JobState.failed and after.problem["title"] == "Worker died"
    assert "died" in after.problem["detail"] and after.finished_at is not None
    assert not tmp.exists() and not tmp.with_name(tmp.name + ".owner").exists() and not work.exists()
    assert not scratch.exists()
    assert live.exists() and unowned.exists()
    assert (data_dir / "prev" / "config.json").exists() and not aside.exists()
    assert not (data_dir / ".prev.tmp-0123456789ab.owner").exists()
    fresh.stop_workers()


def test_full_disk_is_507_and_leaves_nothing(data_dir: Path, build) -> None:
    src = build("FX-B")
    mnt = data_dir / "small"  # the outputs' volume: a 1 MiB tmpfs inside the data directory
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root, or no CAP_SYS_ADMIN)")
    try:
        client = make_client(data_dir)
        before = tree_digest(data_dir / src)
        output = sum(p.stat().st_size for p in (data_dir / src).iterdir())
        st = os.statvfs(mnt)
        filler = mnt / "filler"
        filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - output // 2))  # room for half the output
        r = client.post("/extend-vocab", json={"checkpoint": src, "output": "small/big", **SPEC})
        assert r.status_code == 507, r.text
        body = r.json()
        assert body["title"] == "Insufficient storage" and body["field"] == "output" and "small/big" in body["detail"]
        assert sorted(p.name for p in mnt.iterdir()) == ["filler"] and temporaries(data_dir) == []
        assert tree_digest(data_dir / src) == before
        assert client.get("/jobs", params={"state": "failed"}).json()["jobs"][0]["problem"] == body
        filler.unlink()
        ok = client.post("/extend-vocab", json={"checkpoint": src, "output": "small/big", **SPEC})
        assert ok.status_code == 200, ok.text  # the service keeps serving
        jobs_of(client).stop_workers()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_sixteen_concurrent_jobs_are_all_correct(data_dir: Path, build) -> None:
    from transformers import AutoModelForCausalLM

    client = make_client(data_dir, workers=4)
    src = build("FX-B")
    before = tree_digest(data_dir / src)
    base = tensors(data_dir / src)

    def one(i: int) -> tuple[int, dict]:
        r = client.post("/extend-vocab", json={"checkpoint": src, "output": f"out{i}",
                                               "tokens": [f"<t{k}>" for k in range(i + 1)]})
        return r.status_code, r.json()

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(16)))
    assert [s for s, _ in answers] == [200] * 16, answers
    for i, (_, body) in enumerate(answers):
        assert body["vocab_size_after"] == 128 + i + 1
        model = AutoModelForCausalLM.from_pretrained(data_dir / f"out{i}")
        emb = model.get_input_embeddings().weight
        assert emb.shape == (129 + i, 32)
        assert (emb[:128] == base["model.embed_tokens.weight"].float()).all()
    assert tree_digest(data_dir / src) == before
    states = [j["state"] for j in client.get("/jobs", params={"limit": 100}).json()["jobs"]]
    assert states == ["succeeded"] * 16
    assert temporaries(data_dir) == []


def test_warm_imports_load_what_the_operations_use() -> None:
    import subprocess
    import sys

    code = ("import sys; from adapter_surgery.jobs.service import WARM_MODULES, warm_imports; "
            "before = [m for m in WARM_MODULES if m in sys.modules]; failed = warm_imports(); "
            "print(before, failed, all(m in sys.modules for m in WARM_MODULES if m not in failed))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "service")})
    assert out.stdout.split() == ["[]", "[]", "True"], out.stderr[-2000:]


def test_recovery_leaves_a_job_that_finished_after_the_listing(data_dir: Path) -> None:
    """The recovery loop lists running jobs, then judges each: a job of this process that finished in between (its
    final save done, then gone from the running set) keeps its outcome instead of becoming "Worker died"."""
    service = JobService(Settings(data_dir=data_dir, heartbeat_seconds=0.2))
    try:
        running = JobRecord(job=Job(id=uuid.uuid4().hex, operation="extend-vocab", state=JobState.running,
                                    created_at=datetime.now(UTC)),
                            spec={"checkpoint": "m", "output": "o"}, host=os.uname().nodename, pid=os.getpid(),
                            heartbeat=time.time())
        service.store.insert(running)
        done = running.model_copy(deep=True)
        done.job.state = JobState.succeeded
        service.store.save(done)
        stale_listing = service.store.with_state  # the listing taken before the final save
        service.store.with_state = lambda state: [running] if state == JobState.running else stale_listing(state)
        assert service.recover() == []
        assert service.get(running.job.id).state == JobState.succeeded
        service.store.with_state = stale_listing
        # a record of this process that is still running and not running here (its final save was lost): failed
        service.store.save(running)
        assert service.recover() == [running.job.id]
        assert service.get(running.job.id).problem["title"] == "Worker died"
    finally:
        service.stop_workers()


def test_a_job_is_listed_as_running_here_until_its_outcome_is_saved(data_dir: Path, build) -> None:
    client = make_client(data_dir)
    service = jobs_of(client)
    seen: list[bool] = []
    save = service.store.save

    def recording_save(rec: JobRecord) -> None:
        if rec.job.state == JobState.succeeded:
            seen.append(rec.job.id in service._running)
        save(rec)

    service.store.save = recording_save  # type: ignore[method-assign]
    r = client.post("/extend-vocab", json={"checkpoint": build("FX-B"), "output": "o", **SPEC})
    assert r.status_code == 200, r.text
    assert seen == [True]


def test_stop_with_a_job_past_the_grace_period_fails_it_and_removes_its_temporaries(data_dir: Path, build,
                                                                                   gate: Gate) -> None:
    """A graceful stop (SIGTERM of ``serve``: the lifespan's ``stop_workers``) while a job is held inside a tensor
    write beyond the grace period: its record ends ``failed`` "Service stopped" and its temporaries are removed
    before the process exits (not left ``running`` for the next start-up to find); the job's thread, let go on
    afterwards, changes neither."""
    jobs = JobService(Settings(data_dir=data_dir, heartbeat_seconds=0.2))
    src = build("FX-B")
    before = tree_digest(data_dir / src)
    job = jobs.submit("extend-vocab", {"checkpoint": src, "output": "deep/o", **SPEC})
    assert gate.reached.wait(20)
    assert temporaries(data_dir)
    threads = list(jobs._threads)
    jobs.stop_workers(timeout=0.5)
    stopped = jobs.get(job.id)
    assert stopped.state == JobState.failed and stopped.problem is not None, stopped
    assert stopped.problem["title"] == "Service stopped" and stopped.problem["status"] == 503
    assert temporaries(data_dir) == [] and not (data_dir / "deep" / "o").exists()
    gate.release()
    for t in threads:
        t.join(30)
    assert jobs.get(job.id) == stopped
    assert not (data_dir / "deep" / "o").exists() and temporaries(data_dir) == []
    assert tree_digest(data_dir / src) == before
