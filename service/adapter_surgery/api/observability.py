"""``GET /metrics`` (Prometheus text format) and ``GET /readyz``.

Request metrics are counted by the request-context middleware into a registry of this application (no module
globals). Job metrics are computed at scrape time from the job store (``app.state.jobs``: ``counts``,
``summaries``, ``queue_depth``, ``healthy``), so every replica that shares the store reports the same numbers;
without a job service they are left out.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from adapter_surgery.api.problems import PROBLEM, problem
from adapter_surgery.settings import Settings

log = logging.getLogger("adapter_surgery")
PREFIX = "adapter_surgery"
#: Request durations: API calls answer in milliseconds; sync operations take seconds to minutes.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
JOB_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
#: Less free space than this on the data directory's volume: not ready (every job would answer 507).
MIN_FREE_BYTES = 64 << 20


class HttpMetrics:
    """The request counter and duration histogram, in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(f"{PREFIX}_http_requests", "HTTP requests answered, by route template and status.",
                                ["method", "route", "status"], registry=registry)
        self.duration = Histogram(f"{PREFIX}_http_request_duration_seconds", "Time to answer an HTTP request.",
                                  ["method", "route"], buckets=REQUEST_BUCKETS, registry=registry)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.duration.labels(method, route).observe(seconds)


class JobCollector(Collector):
    """Job metrics from ``app.state.jobs`` at scrape time: jobs by state (``counts``), queue depth, job durations
    (finished records, ``started_at`` → ``finished_at``) and bytes read/written (recorded in each record when its
    job finished), from ``summaries`` (one light row per record: no result is loaded)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        jobs = getattr(self.app.state, "jobs", None)
        if jobs is None:
            return
        try:
            states = jobs.counts()
            rows = jobs.summaries()
            depth = jobs.queue_depth()
        except Exception:  # the store is down: /readyz says so; the scrape still answers the request metrics
            log.warning("job metrics unavailable", exc_info=True)
            return
        by_state = GaugeMetricFamily(f"{PREFIX}_jobs", "Job records in the store, by state.", labels=["state"])
        for state in sorted(set(JOB_STATES) | set(states)):
            by_state.add_metric([state], states.get(state, 0))
        yield by_state
        yield GaugeMetricFamily(f"{PREFIX}_job_queue_depth", "Jobs waiting for a worker.", value=depth)
        durations, read, written = [], 0, 0
        for _state, started, finished, bytes_read, bytes_written in rows:
            if started is not None and finished is not None:
                durations.append(max(finished - started, 0.0))
            read += int(bytes_read or 0)
            written += int(bytes_written or 0)
        counts = [sum(d <= b for d in durations) for b in JOB_BUCKETS]
        hist = HistogramMetricFamily(f"{PREFIX}_job_duration_seconds", "Time from a job's start to its end "
                                     "(finished records in the store).")
        hist.add_metric([], [*((floatToGoString(b), c) for b, c in zip(JOB_BUCKETS, counts, strict=True)),
                             ("+Inf", len(durations))], sum_value=sum(durations))
        yield hist
        yield CounterMetricFamily(f"{PREFIX}_job_bytes_read", "Bytes read by the jobs in the store.", value=read)
        yield CounterMetricFamily(f"{PREFIX}_job_bytes_written", "Bytes written by the jobs in the store.",
                                  value=written)


def _probe_data_dir(data_dir: Path) -> str | None:
    """None when a file can be created and removed in ``data_dir`` and its volume has :data:`MIN_FREE_BYTES` free;
    else why not."""
    probe = data_dir / f".adapter-surgery-readyz-{uuid.uuid4().hex}"
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        probe.unlink()
    except OSError as exc:
        return f"the data directory {data_dir} is not writable ({exc.strerror or exc})"
    free = shutil.disk_usage(data_dir).free
    if free < MIN_FREE_BYTES:
        return (f"the data directory's volume has {free / 2**20:.1f} MiB free, under the {MIN_FREE_BYTES >> 20} MiB "
                "a job needs to write anything (every job would answer 507)")
    return None


def install(app: FastAPI, settings: Settings) -> HttpMetrics:
    """Add ``/metrics`` and ``/readyz`` to ``app``; return the request metrics for the middleware."""
    registry = CollectorRegistry()
    metrics = HttpMetrics(registry)
    registry.register(JobCollector(app))
    app.state.metrics_registry = registry

    @app.get("/metrics", tags=["service"], summary="Prometheus metrics", response_class=Response,
             responses={200: {"description": "Prometheus text exposition format.",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}})
    def metrics_endpoint() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/readyz", tags=["service"], summary="Readiness: data directory writable, job store and workers up",
             responses={200: {"description": "Ready.", "content": {"application/json": {"schema": {
                 "type": "object", "required": ["status", "checks"],
                 "properties": {"status": {"type": "string", "enum": ["ready"]},
                                "checks": {"type": "object", "additionalProperties": {"type": "string"}}}}}}},
                        503: {"description": "Not ready; `detail` says why.",
                              "content": {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}}}})
    async def readyz(request: Request) -> JSONResponse:
        checks: dict[str, str] = {}
        reasons: list[str] = []
        failed = await run_in_threadpool(_probe_data_dir, settings.data_dir)
        checks["data_dir"] = failed or "ok"
        if failed:
            reasons.append(failed)
        jobs = getattr(request.app.state, "jobs", None)
        if jobs is not None:
            try:
                ok, why = await run_in_threadpool(jobs.healthy)
            except Exception as exc:
                ok, why = False, f"{type(exc).__name__}: {exc}"
            checks["jobs"] = "ok" if ok else f"job store or workers unavailable: {why}"
            if not ok:
                reasons.append(checks["jobs"])
        if reasons:
            return problem(503, "Not ready", "; ".join(reasons), checks=checks,
                           fix="See the checks; the service answers again once they pass.")
        return JSONResponse({"status": "ready", "checks": checks})

    return metrics
