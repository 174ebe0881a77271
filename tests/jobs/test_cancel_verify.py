"""A cancel reaches an operation's verify phase (``"verify": true``): the report runs on the finished temporary
output, which is published only after it, so a cancel during verify (``DELETE /jobs/{id}``, a synchronous client
that disconnects) leaves nothing at the output, and an output that ``overwrite`` would have replaced is kept."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import adapter_surgery.report as report_lib
from adapter_surgery.api.app import create_app
from adapter_surgery.api.jobs import await_job
from adapter_surgery.jobs import JobService, JobState
from adapter_surgery.settings import Settings
from tests.conftest import tree_digest
from tests.jobs.helpers import hold_call, release_when_cancelled, temporaries

SPEC = {"tokens": ["<a>", "<b>"], "verify": True}


@pytest.mark.parametrize("how", ["delete", "disconnect", "overwrite"])
def test_cancel_during_verify_leaves_nothing(data_dir: Path, build, monkeypatch: pytest.MonkeyPatch,
                                             how: str) -> None:
    client = TestClient(create_app(Settings(data_dir=data_dir, heartbeat_seconds=0.1)),
                        raise_server_exceptions=False)
    jobs: JobService = client.app.state.jobs  # type: ignore[attr-defined]
    src = build("FX-B")
    before = tree_digest(data_dir / src)
    overwrite = how == "overwrite"
    if overwrite:  # a previous output the cancelled job would have replaced
        r = client.post("/extend-vocab", json={"checkpoint": src, "output": "o", "tokens": ["<old>"]})
        assert r.status_code == 200, r.text
        previous = tree_digest(data_dir / "o")
    gate = hold_call(monkeypatch, report_lib, "run_model", nth=2)  # the base runs first, then the patched model
    job = jobs.submit("extend-vocab", {"checkpoint": src, "output": "o", "overwrite": overwrite, **SPEC})
    assert gate.reached.wait(60)
    release_when_cancelled(jobs, job.id, gate)
    if how == "disconnect":
        class Gone:
            async def is_disconnected(self) -> bool:
                return True

        ended = asyncio.run(await_job(jobs, job.id, Gone()))  # type: ignore[arg-type]
    else:
        d = client.delete(f"/jobs/{job.id}")
        assert d.status_code == 200, d.text
        ended = jobs.get(job.id)
        assert d.json()["state"] == ended.state.value
    assert ended.state == JobState.cancelled, ended
    assert ended.problem is not None and ended.problem["status"] == 409
    if overwrite:
        assert tree_digest(data_dir / "o") == previous
    else:
        assert not (data_dir / "o").exists()
    assert temporaries(data_dir) == []
    assert tree_digest(data_dir / src) == before
    jobs.stop_workers()
