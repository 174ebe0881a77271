"""The job routes (``GET /jobs/{id}``, ``GET /jobs``, ``DELETE /jobs/{id}``) and what the operation routes use to
run through the queue: ``Prefer: respond-async`` (202 + the job), or await the job and answer as before."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import FastAPI, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from adapter_surgery.api.problems import PROBLEM
from adapter_surgery.errors import QueueFull
from adapter_surgery.jobs import FINISHED, Job, JobService, JobState

#: Longest ``DELETE /jobs/{id}`` waits for a running job to reach its next tensor or shard boundary.
CANCEL_WAIT_S = 10.0
JOB_ID = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$", description="The job id (32 hex digits).")]


class JobList(BaseModel):
    jobs: list[Job] = Field(description="Newest first.")
    next_cursor: str | None = Field(None, description="Pass as ?cursor= for the next page; null on the last.")


def wants_async(request: Request) -> bool:
    """Whether the request has ``Prefer: respond-async`` (RFC 7240; other preferences may follow)."""
    prefs = ",".join(request.headers.getlist("prefer")).lower()
    return any(p.split(";")[0].split("=")[0].strip() == "respond-async" for p in prefs.split(","))


def accepted(job: Job) -> JSONResponse:
    """``202 Accepted``: the job, where to follow it, and that the preference was applied."""
    return JSONResponse(job.model_dump(mode="json"), status_code=202,
                        headers={"Location": f"/jobs/{job.id}", "Preference-Applied": "respond-async"})


def problem_of(job: Job) -> JSONResponse:
    body = job.problem or {"type": "about:blank", "title": "Internal error", "status": 500,
                           "detail": f"job {job.id} ended {job.state.value} without a problem"}
    return JSONResponse(body, status_code=int(body.get("status", 500)), media_type=PROBLEM)


async def await_job(jobs: JobService, job_id: str, request: Request | None = None,
                    timeout: float | None = None) -> Job:
    """Wait for a job without blocking the event loop: woken at once when this process runs it, else polling
    (20 ms growing to 0.5 s). When the client of ``request`` disconnects, the job is cancelled (its work stops at
    the next tensor or shard boundary and nothing is left), and the finished job is returned."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    unsubscribe = jobs.on_finish(job_id, lambda: loop.call_soon_threadsafe(done.set))
    deadline = None if timeout is None else loop.time() + timeout
    delay, cancelled = 0.02, False
    try:
        while True:
            job = jobs.get(job_id)
            if job.state in FINISHED or (deadline is not None and loop.time() >= deadline):
                return job
            if request is not None and not cancelled and await request.is_disconnected():
                cancelled = True
                await run_in_threadpool(jobs.cancel, job_id)
            try:
                await asyncio.wait_for(done.wait(), delay)
            except TimeoutError:
                delay = min(delay * 1.5, 0.5)
    finally:
        unsubscribe()


async def submit(jobs: JobService, op_name: str, spec: dict, data_dir_rel: str = "") -> Job:
    return await run_in_threadpool(lambda: jobs.submit(op_name, spec, data_dir_rel=data_dir_rel))


def install(app: FastAPI, jobs: JobService) -> None:
    """Add the job routes, and the ``Retry-After`` header of a 429 when the queue is full."""

    @app.exception_handler(QueueFull)
    async def _queue_full(_: Request, exc: QueueFull) -> JSONResponse:
        return JSONResponse(exc.to_problem(), status_code=429, media_type=PROBLEM,
                            headers={"Retry-After": str(exc.retry_after)})

    @app.get("/jobs/{job_id}", response_model=Job, tags=["jobs"], operation_id="get_job",
             summary="A job: its state, progress, and its result or problem once finished.")
    def get_job(job_id: JOB_ID) -> Job:
        return jobs.get(job_id)

    @app.get("/jobs", response_model=JobList, tags=["jobs"], operation_id="list_jobs",
             summary="The jobs this service keeps, newest first (paginated).",
             description="Each listed job leaves out its `result` (null here; a large job's result runs to megabytes) "
                         "but keeps its `problem`: `GET /jobs/{id}` answers the full job.")
    def list_jobs(state: JobState | None = None, limit: Annotated[int, Query(ge=1, le=500)] = 50,
                  cursor: Annotated[str | None, Query(max_length=200)] = None) -> JobList:
        items, nxt = jobs.list(state, limit, cursor)
        return JobList(jobs=items, next_cursor=nxt)

    @app.delete("/jobs/{job_id}", response_model=Job, tags=["jobs"], operation_id="cancel_job",
                summary="Cancel a job: a queued one never runs; a running one stops at its next tensor or shard "
                        "boundary and its temporary files are removed; a finished one is unchanged.",
                description="The answer is the job once it has stopped (`cancelled`), waited for up to "
                            f"{CANCEL_WAIT_S:g} s; a job that reaches no boundary (a tensor written, a target "
                            "decomposed, a verify probe run) within that time is answered still `running` with "
                            "`cancel_requested: true`, and stops at that boundary (follow it with GET /jobs/{id}).")
    async def cancel_job(job_id: JOB_ID) -> Response:
        job = await run_in_threadpool(jobs.cancel, job_id)
        if job.state not in FINISHED:
            job = await await_job(jobs, job_id, timeout=CANCEL_WAIT_S)
        return JSONResponse(job.model_dump(mode="json"))
