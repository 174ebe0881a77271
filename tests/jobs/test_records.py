"""What a finished job's record keeps for /metrics (bytes read and written), and what GET /jobs lists."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from adapter_surgery.api.app import create_app
from adapter_surgery.jobs import Job, JobRecord, JobService, JobState
from adapter_surgery.jobs.models import JobProgress
from adapter_surgery.settings import Settings
from tests.jobs.helpers import finished, until

SPEC = {"tokens": ["<a>", "<b>"]}


def metric(client: TestClient, name: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name == name and not s.labels:
                return s.value
    raise AssertionError(name)


def test_bytes_read_and_written_are_recorded_when_a_job_finishes(data_dir: Path) -> None:
    client = TestClient(create_app(Settings(data_dir=data_dir)))
    jobs: JobService = client.app.state.jobs  # type: ignore[attr-defined]
    jobs.start()
    for result, done in (({"base_bytes_read": 1000}, 300), ({"bytes_read": 20}, 0), (None, 5000)):
        job = Job(id=uuid.uuid4().hex, operation="merge-lora", state=JobState.running, created_at=datetime.now(UTC),
                  started_at=datetime.now(UTC), progress=JobProgress(done=done, total=done, unit="bytes"))
        rec = JobRecord(job=job)
        jobs.store.insert(rec)
        jobs._finish(rec, JobState.succeeded if result else JobState.failed, result=result)
    rows = sorted(jobs.summaries(), key=lambda r: r[3])
    assert [(r[0], r[3], r[4]) for r in rows] == [("failed", 0, 0), ("succeeded", 20, 0), ("succeeded", 1000, 300)]
    assert all(r[1] is not None and r[2] is not None and r[2] >= r[1] for r in rows)
    assert metric(client, "adapter_surgery_job_bytes_read_total") == 1020
    assert metric(client, "adapter_surgery_job_bytes_written_total") == 300  # a failed job's bytes were discarded
    jobs.stop_workers()


def test_list_leaves_out_results_get_keeps_them(data_dir: Path, build) -> None:
    client = TestClient(create_app(Settings(data_dir=data_dir)))
    src = build("FX-A")
    ok = client.post("/extend-vocab", json={"checkpoint": src, "output": "o", **SPEC}).json()
    bad = client.post("/extend-vocab", json={"checkpoint": src, "output": "o", **SPEC})
    assert bad.status_code == 409
    listed = client.get("/jobs").json()["jobs"]
    assert [j["result"] for j in listed] == [None, None]
    assert listed[0]["problem"] == bad.json()  # problems stay (they are small)
    succeeded = listed[1]
    full = client.get(f"/jobs/{succeeded['id']}").json()
    assert full["result"]["vocab_size_after"] == ok["vocab_size_after"]
    assert metric(client, "adapter_surgery_job_bytes_written_total") > 0
    jobs: JobService = client.app.state.jobs  # type: ignore[attr-defined]
    until(lambda: finished(jobs, succeeded["id"]))
    jobs.stop_workers()
