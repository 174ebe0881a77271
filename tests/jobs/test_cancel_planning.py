"""A cancel reaches extend-vocab while it plans its tokens (before any tensor is written), and that phase reports
progress."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from adapter_surgery.api.app import create_app
from adapter_surgery.jobs import JobService
from adapter_surgery.settings import Settings
from tests.conftest import tree_digest
from tests.jobs.helpers import hold_call, release_when_cancelled, temporaries, until

extend_vocab = importlib.import_module("adapter_surgery.ops.extend_vocab")  # the package exports the function
N_TOKENS = 5000
HOLD_AT = 1500  # past the first progress step (PLAN_STEP), before the second


def test_cancel_during_token_planning(data_dir: Path, build, monkeypatch: pytest.MonkeyPatch) -> None:
    client = TestClient(create_app(Settings(data_dir=data_dir, heartbeat_seconds=0.1)),
                        raise_server_exceptions=False)
    jobs: JobService = client.app.state.jobs  # type: ignore[attr-defined]
    src = build("FX-B")
    before = tree_digest(data_dir / src)
    # called once per new token, in the planning loop: hold the job there until the cancel was asked for
    gate = hold_call(monkeypatch, extend_vocab, "_source_for", nth=HOLD_AT)  # past the first progress step
    tokens = [f"<planned-{i}>" for i in range(N_TOKENS)]
    r = client.post("/extend-vocab", json={"checkpoint": src, "output": "o", "tokens": tokens},
                    headers={"Prefer": "respond-async"})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert gate.reached.wait(60)
    # progress moved during the planning phase (the heartbeat writes the latest numbers)
    p = until(lambda: (q := client.get(f"/jobs/{job_id}").json()["progress"])["done"] > 0 and q)
    assert isinstance(p, dict) and p["unit"] == "tokens" and 0 < p["fraction"] < 1
    assert p["stage"].startswith("planning tokens"), p

    release_when_cancelled(jobs, job_id, gate)
    d = client.delete(f"/jobs/{job_id}")
    assert d.status_code == 200 and d.json()["state"] == "cancelled", d.text
    assert d.json()["problem"]["status"] == 409
    assert gate.calls < 2 * extend_vocab.PLAN_STEP + 1  # stopped at the next boundary, not after all the tokens
    assert not (data_dir / "o").exists() and temporaries(data_dir) == []
    assert tree_digest(data_dir / src) == before
    jobs.stop_workers()
