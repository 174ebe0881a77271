"""``DELETE /jobs/{id}`` answers the job once stopped: a PiSSA decomposition stops at its next target, so the
answer is the cancelled job; a job that does not reach a boundary within ``CANCEL_WAIT_S`` is answered still
``running`` with ``cancel_requested: true``, and stops at its next boundary."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from adapter_surgery.api import jobs as job_routes
from adapter_surgery.api.app import create_app
from adapter_surgery.jobs import JobService
from adapter_surgery.ops.attach_lora import decompose
from adapter_surgery.settings import Settings
from tests.conftest import tree_digest
from tests.jobs.helpers import finished, hold_call, release_when_cancelled, temporaries, until

LORA = {"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": "pissa"}


def _client(data_dir: Path) -> tuple[TestClient, JobService]:
    client = TestClient(create_app(Settings(data_dir=data_dir, heartbeat_seconds=0.1)),
                        raise_server_exceptions=False)
    return client, client.app.state.jobs  # type: ignore[attr-defined]


def test_delete_during_pissa_answers_the_cancelled_job(data_dir: Path, build,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    client, jobs = _client(data_dir)
    src = build("FX-B")
    before = tree_digest(data_dir / src)
    gate = hold_call(monkeypatch, decompose, "pissa")  # the first target's SVD holds
    r = client.post("/attach-lora", json={"checkpoint": src, "output": "o", **LORA},
                    headers={"Prefer": "respond-async"})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert gate.reached.wait(60)
    assert temporaries(data_dir)  # the residual base is being written
    release_when_cancelled(jobs, job_id, gate)
    d = client.delete(f"/jobs/{job_id}")
    assert d.status_code == 200 and d.json()["state"] == "cancelled", d.text
    assert d.json()["problem"]["status"] == 409 and d.json()["cancel_requested"] is True
    assert not (data_dir / "o").exists() and temporaries(data_dir) == []
    assert tree_digest(data_dir / src) == before
    jobs.stop_workers()


def test_delete_answers_a_job_still_stopping_after_the_bound(data_dir: Path, build,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    client, jobs = _client(data_dir)
    monkeypatch.setattr(job_routes, "CANCEL_WAIT_S", 0.3)
    src = build("FX-B")
    gate = hold_call(monkeypatch, decompose, "pissa")
    job_id = client.post("/attach-lora", json={"checkpoint": src, "output": "o", **LORA},
                         headers={"Prefer": "respond-async"}).json()["id"]
    assert gate.reached.wait(60)
    d = client.delete(f"/jobs/{job_id}")  # the job holds in its first target past the bound
    assert d.status_code == 200, d.text
    assert d.json()["state"] == "running" and d.json()["cancel_requested"] is True
    gate.release()
    until(lambda: finished(jobs, job_id))
    assert jobs.get(job_id).state.value == "cancelled"
    assert not (data_dir / "o").exists() and temporaries(data_dir) == []
    jobs.stop_workers()
