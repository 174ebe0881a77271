"""/metrics, /readyz, request ids and the JSON access log."""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from adapter_surgery.api import observability
from adapter_surgery.api.app import create_app
from adapter_surgery.logs import JsonFormatter, configure_logging
from adapter_surgery.settings import Settings


@pytest.fixture
def client(data_dir: Path) -> TestClient:
    return TestClient(create_app(Settings(data_dir=data_dir)), raise_server_exceptions=False)


def samples(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_request_metrics_by_route_template_and_status(client: TestClient, build) -> None:
    src = build("FX-B")
    assert client.post("/extend-vocab", json={"checkpoint": src, "output": "o", "tokens": ["<a>"]}).status_code == 200
    assert client.post("/extend-vocab", json={"checkpoint": src, "output": "o", "tokens": ["<a>"]}).status_code == 409
    assert client.post("/extend-vocab", json={"checkpoint": src, "output": "p", "tokenz": []}).status_code == 422
    for path in ("/nope/1", "/nope/2", "/healthz"):
        client.get(path)
    s = samples(client)

    def count(route: str, status: str, method: str = "POST") -> float:
        return s.get(("adapter_surgery_http_requests_total",
                      (("method", method), ("route", route), ("status", status))), 0)

    assert count("/extend-vocab", "200") == 1 and count("/extend-vocab", "409") == 1
    assert count("/extend-vocab", "422") == 1
    assert count("<unmatched>", "404", "GET") == 2  # raw paths never become labels
    assert count("/healthz", "200", "GET") == 1
    hist = ("adapter_surgery_http_request_duration_seconds_count", (("method", "POST"), ("route", "/extend-vocab")))
    assert s[hist] == 3
    assert s[("adapter_surgery_http_request_duration_seconds_sum", hist[1])] > 0
    # the two valid requests ran as jobs (the third failed validation before any job): one succeeded, one failed
    assert s[("adapter_surgery_jobs", (("state", "succeeded"),))] == 1
    assert s[("adapter_surgery_jobs", (("state", "failed"),))] == 1
    assert s[("adapter_surgery_job_duration_seconds_count", ())] == 2
    assert s[("adapter_surgery_job_queue_depth", ())] == 0
    assert s[("adapter_surgery_job_bytes_written_total", ())] > 0  # the rewritten shards of the succeeded job


def test_each_app_has_its_own_registry(data_dir: Path) -> None:
    a, b = TestClient(create_app(Settings(data_dir=data_dir))), TestClient(create_app(Settings(data_dir=data_dir)))
    a.get("/healthz")
    key = ("adapter_surgery_http_requests_total", (("method", "GET"), ("route", "/healthz"), ("status", "200")))
    assert samples(a)[key] == 1 and key not in samples(b)


@dataclass
class FakeJob:
    state: str
    started_at: datetime | None = None
    finished_at: datetime | None = None
    bytes_read: int = 0
    bytes_written: int = 0


@dataclass
class FakeJobs:
    jobs: list[FakeJob] = field(default_factory=list)
    ok: tuple[bool, str] = (True, "")
    calls: list[str] = field(default_factory=list)

    def list(self, *_: Any) -> Any:
        raise AssertionError("/metrics must not list (and so load) the job records")

    def counts(self) -> dict[str, int]:
        self.calls.append("counts")
        return {s: sum(j.state == s for j in self.jobs) for s in ("queued", "running", "succeeded", "failed",
                                                                   "cancelled")}

    def summaries(self) -> list[tuple[str, float | None, float | None, int, int]]:
        self.calls.append("summaries")
        return [(j.state, j.started_at and j.started_at.timestamp(), j.finished_at and j.finished_at.timestamp(),
                 j.bytes_read, j.bytes_written) for j in self.jobs]

    def queue_depth(self) -> int:
        return sum(j.state == "queued" for j in self.jobs)

    def healthy(self) -> tuple[bool, str]:
        return self.ok


def test_job_metrics_are_computed_from_the_store(client: TestClient) -> None:
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    done = [FakeJob("succeeded", t0, t0 + timedelta(seconds=s), 100 * s, 10 * s) for s in (1, 3, 700)]
    store = FakeJobs([*done, FakeJob("failed", t0, t0 + timedelta(seconds=2)), FakeJob("running", t0),
                      *[FakeJob("queued") for _ in range(600)]])
    client.app.state.jobs = store
    s = samples(client)
    by_state = {dict(labels)["state"]: v for (name, labels), v in s.items() if name == "adapter_surgery_jobs"}
    assert by_state == {"queued": 600, "running": 1, "succeeded": 3, "failed": 1, "cancelled": 0}
    assert s[("adapter_surgery_job_queue_depth", ())] == 600
    assert store.calls == ["counts", "summaries"]  # one query each, no record loaded
    assert s[("adapter_surgery_job_duration_seconds_count", ())] == 4
    assert s[("adapter_surgery_job_duration_seconds_sum", ())] == 706
    assert s[("adapter_surgery_job_duration_seconds_bucket", (("le", "2.5"),))] == 2
    assert s[("adapter_surgery_job_duration_seconds_bucket", (("le", "600.0"),))] == 3
    assert s[("adapter_surgery_job_bytes_read_total", ())] == 70400
    assert s[("adapter_surgery_job_bytes_written_total", ())] == 7040


def test_readyz(client: TestClient, data_dir: Path) -> None:
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready", "checks": {"data_dir": "ok", "jobs": "ok"}}
    assert [p.name for p in data_dir.iterdir() if p.name != ".adapter-surgery"] == []  # the probe file is removed
    client.app.state.jobs = FakeJobs()
    assert client.get("/readyz").json()["checks"] == {"data_dir": "ok", "jobs": "ok"}
    client.app.state.jobs = FakeJobs(ok=(False, "no worker alive"))
    r = client.get("/readyz")
    assert r.status_code == 503 and r.headers["content-type"] == "application/problem+json"
    assert "no worker alive" in r.json()["detail"] and r.json()["checks"]["data_dir"] == "ok"


def test_readyz_unwritable_data_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    client = TestClient(create_app(Settings(data_dir=blocker / "data")))  # unwritable even for root
    r = client.get("/readyz")
    assert r.status_code == 503 and r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["title"] == "Not ready" and "not writable" in body["detail"] and str(blocker) in body["detail"]
    assert body["checks"]["data_dir"].startswith("the data directory")
    assert client.get("/healthz").status_code == 200  # alive, not ready


def test_request_id_is_taken_or_generated_and_echoed(client: TestClient) -> None:
    r = client.get("/healthz", headers={"X-Request-ID": "trace-42/abc"})
    assert r.headers["x-request-id"] == "trace-42/abc"
    for bad in ("has space", "x" * 129, ""):
        r = client.get("/healthz", headers={"X-Request-ID": bad})
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"]), bad
    ids = {client.get("/nope").headers["x-request-id"], client.post("/extend-vocab", json={}).headers["x-request-id"]}
    assert len(ids) == 2


def test_an_unexpected_error_keeps_the_request_id(client: TestClient) -> None:
    def boom() -> None:
        raise RuntimeError("kaput")

    client.app.add_api_route("/boom", boom)
    r = client.get("/boom", headers={"X-Request-ID": "rid-500"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "rid-500"
    assert r.json()["request_id"] == "rid-500" and "Traceback" not in r.text


@pytest.fixture
def json_log() -> io.StringIO:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("adapter_surgery")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(old)


def test_one_json_log_line_per_request(client: TestClient, json_log: io.StringIO, build) -> None:
    src = build("FX-B")
    client.get("/healthz", headers={"X-Request-ID": "rid-1"})
    client.post("/extend-vocab", json={"checkpoint": src, "output": "o", "tokens": ["<a>"]},
                headers={"X-Request-ID": "rid-2"})
    client.get("/nope", headers={"X-Request-ID": "rid-3"})
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    access = [e for e in lines if e["logger"] == "adapter_surgery.access"]
    assert [(e["request_id"], e["method"], e["path"], e["status"]) for e in access] == [
        ("rid-1", "GET", "/healthz", 200), ("rid-2", "POST", "/extend-vocab", 200), ("rid-3", "GET", "/nope", 404)]
    for e in access:
        assert e["level"] == "info" and e["duration_ms"] >= 0 and e["client"] == "testclient:50000"
        assert datetime.fromisoformat(e["time"]).tzinfo is not None
    assert access[1]["route"] == "/extend-vocab" and access[2]["route"] == "<unmatched>"


def test_extra_fields_and_exceptions_in_json_lines(json_log: io.StringIO) -> None:
    log = logging.getLogger("adapter_surgery")
    log.info("job %s running", "j1", extra={"job_id": "j1", "operation": "attach-lora"})
    try:
        raise ValueError("bad")
    except ValueError:
        log.exception("failed", extra={"job_id": "j1"})
    first, second = (json.loads(line) for line in json_log.getvalue().splitlines())
    assert first["message"] == "job j1 running" and first["job_id"] == "j1" and first["operation"] == "attach-lora"
    assert second["level"] == "error" and "ValueError: bad" in second["exc_info"]


def test_configure_logging_replaces_handlers(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    try:
        configure_logging(json_lines=True)
        configure_logging(json_lines=True)
        logging.getLogger("adapter_surgery").info("hello", extra={"job_id": "j9"})
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and json.loads(err[0])["job_id"] == "j9"
        configure_logging(json_lines=False)
        logging.getLogger("adapter_surgery").info("plain")
        assert capsys.readouterr().err.rstrip().endswith("INFO adapter_surgery plain")
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved:
            root.addHandler(h)
        root.setLevel(level)


def test_readyz_full_volume(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file can still be created on a full volume: the free space is checked too (every job answered 507 while
    /readyz said ready)."""
    usage = shutil.disk_usage
    monkeypatch.setattr(observability.shutil, "disk_usage", lambda p: usage(p)._replace(free=(1 << 20) + 1))
    r = client.get("/readyz")
    assert r.status_code == 503 and "1.0 MiB free, under the 64 MiB" in r.json()["checks"]["data_dir"], r.text
    monkeypatch.undo()
    assert client.get("/readyz").status_code == 200
