"""The FastAPI application: one ``POST /<operation>`` route per entry of ``OPERATIONS``, plus ``/healthz``.

Each route takes either a JSON body (the operation's spec; paths under the data directory) or the upload
form (``multipart/form-data`` with ``file`` and ``spec``) and only translates to and from the core.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from adapter_surgery import __version__
from adapter_surgery.api import jobs as job_routes
from adapter_surgery.api import middleware, observability, problems
from adapter_surgery.api.openapi import build_openapi, request_body, responses, takes_upload
from adapter_surgery.api.uploads import MAX_RESULT_HEADER, RESULT_HEADER, answer_upload, receive_upload
from adapter_surgery.api.uploads import result_header as _result_header
from adapter_surgery.io.writer import DigestCache
from adapter_surgery.jobs import JobService, JobState
from adapter_surgery.ops import OPERATIONS, Operation
from adapter_surgery.settings import Settings

__all__ = ["MAX_RESULT_HEADER", "RESULT_HEADER", "_result_header", "app_from_env", "create_app"]

#: Seconds a graceful stop waits for running jobs to reach a boundary before recording them failed "Service stopped".
JOBS_STOP_S = 5.0


class Health(BaseModel):
    status: str
    version: str
    device: str
    data_dir: str


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the application; ``settings`` default to the environment (``ADAPTER_SURGERY_*``)."""
    settings = settings or Settings()
    digests = DigestCache()  # per application: repeated requests on one base skip hashing its unchanged shards
    jobs = JobService(settings, digests)  # touches nothing until first used

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(jobs.start)  # recover dead workers' jobs, sweep stale temporaries, start workers
        yield
        # after uvicorn's wait for requests in flight (up to 30 s): the jobs still running stop at their next boundary
        # or are recorded failed, their temporaries removed, within JOBS_STOP_S (inside docker stop's -t 40)
        await run_in_threadpool(jobs.stop_workers, JOBS_STOP_S)

    app = FastAPI(title="adapter-surgery", version=__version__, lifespan=lifespan,
                  description="Add new tokens, LoRA adapters and classification heads to pretrained checkpoints, "
                              "initialized correctly, at a cost that grows with what changes.")
    app.state.jobs = jobs
    problems.install(app)
    metrics = observability.install(app, settings)  # /metrics, /readyz
    middleware.install(app, settings, metrics.observe)  # request id, access log, token, body limits
    job_routes.install(app, jobs)

    @app.get("/healthz", response_model=Health)
    def healthz() -> Health:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return Health(status="ok", version=__version__, device=device, data_dir=str(settings.data_dir))

    for op in OPERATIONS.values():
        _add_route(app, op, settings, jobs)
    app.openapi = lambda: build_openapi(app)  # type: ignore[method-assign]
    return app


def _add_route(app: FastAPI, op: Operation, settings: Settings, jobs: JobService) -> None:
    async def handler(request: Request) -> Response:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            return await _run_json(op, await request.body(), settings, jobs, request)
        if ctype == "multipart/form-data" and takes_upload(op):
            return await _run_upload(op, request, settings, jobs)
        takes = "application/json or multipart/form-data" if takes_upload(op) else "application/json only"
        return problems.problem(415, "Unsupported media type", f"POST /{op.name} takes {takes}, not {ctype!r}",
                                fix="Send the spec as JSON" + (", or upload the checkpoint as multipart form data."
                                                               if takes_upload(op) else "."))

    handler.__name__ = op.name.replace("-", "_")
    app.add_api_route(f"/{op.name}", handler, methods=["POST"], summary=op.summary, response_model=op.result,
                      responses=responses(op, RESULT_HEADER), openapi_extra=request_body(op))


def _with_default_device(spec: BaseModel, settings: Settings) -> BaseModel:
    if getattr(spec, "device", None) == "auto" and settings.device != "auto":
        return spec.model_copy(update={"device": settings.device})
    return spec


async def _run_json(op: Operation, body: bytes, settings: Settings, jobs: JobService, request: Request) -> Response:
    """Validate, queue the job; answer 202 + the job (``Prefer: respond-async``), else await it and answer its
    result or problem as the operation always did (the client going away cancels it)."""
    try:
        spec = op.spec.model_validate_json(body)
    except ValidationError as exc:
        return problems.validation_problem(list(exc.errors()))
    fields = _with_default_device(spec, settings).model_dump(mode="json", exclude_unset=True)
    if job_routes.wants_async(request):
        return job_routes.accepted(await job_routes.submit(jobs, op.name, fields))
    await run_in_threadpool(jobs.require_worker)
    job = await job_routes.submit(jobs, op.name, fields)
    job = await job_routes.await_job(jobs, job.id, request)
    if job.state == JobState.succeeded:
        return JSONResponse(job.result)
    return job_routes.problem_of(job)


async def _run_upload(op: Operation, request: Request, settings: Settings, jobs: JobService) -> Response:
    """The upload form, through the same queue: the upload is streamed into the data directory's scratch area
    (``.adapter-surgery/scratch/<id>``, where any worker sees it), the job runs there, and the answer (the output)
    is streamed from disk."""
    if job_routes.wants_async(request):
        return problems.problem(400, "Bad request", "the upload form answers with the output itself, so it cannot "
                                "run asynchronously (Prefer: respond-async)", field="Prefer",
                                fix="Drop the Prefer header, or place the checkpoint under the data directory and "
                                    "send the JSON form, which can.")
    await run_in_threadpool(jobs.require_worker)
    upload = await receive_upload(request, settings, op.options)  # streamed to the scratch area, unpacked
    try:
        spec = _with_default_device(op.spec.model_validate(upload.spec_fields()), settings)
        job = await job_routes.submit(jobs, op.name, spec.model_dump(mode="json", exclude_unset=True),
                                      upload.data_dir_rel)
        job = await job_routes.await_job(jobs, job.id, request)
    except BaseException:
        upload.discard()
        raise
    if job.state != JobState.succeeded:
        upload.discard()
        return job_routes.problem_of(job)
    return await answer_upload(upload, job.result or {}, job.id)  # streamed from disk, then removed


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory adapter_surgery.api.app:app_from_env``."""
    return create_app()
