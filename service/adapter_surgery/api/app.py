"""The FastAPI application: one ``POST /<operation>`` route per entry of ``OPERATIONS``, plus ``/healthz``.

Each route takes either a JSON body (the operation's spec; paths under the data directory) or the upload
form (``multipart/form-data`` with ``file`` and ``spec``) and only translates to and from the core.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from adapter_surgery import __version__
from adapter_surgery.api import jobs as job_routes
from adapter_surgery.api import problems
from adapter_surgery.api.openapi import build_openapi, request_body, responses
from adapter_surgery.api.uploads import pack_output, unpack_upload
from adapter_surgery.errors import InvalidSpec, PayloadTooLarge
from adapter_surgery.io.atomic import make_work_dir
from adapter_surgery.io.writer import DigestCache
from adapter_surgery.jobs import Job, JobService, JobState
from adapter_surgery.ops import OPERATIONS, Operation
from adapter_surgery.settings import Settings

RESULT_HEADER = "X-Adapter-Surgery-Result"
#: Bytes of result JSON in the header at most.
MAX_RESULT_HEADER = 7 * 1024


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
        await run_in_threadpool(jobs.stop_workers)

    app = FastAPI(title="adapter-surgery", version=__version__, lifespan=lifespan,
                  description="Add new tokens, LoRA adapters and classification heads to pretrained checkpoints, "
                              "initialized correctly, at a cost that grows with what changes.")
    app.state.jobs = jobs
    problems.install(app)
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
        if ctype == "multipart/form-data":
            return await _run_upload(op, request, settings, jobs)
        return problems.problem(415, "Unsupported media type",
                                f"POST /{op.name} takes application/json or multipart/form-data, not {ctype!r}",
                                fix="Send the spec as JSON, or upload the checkpoint as multipart form data.")

    handler.__name__ = op.name.replace("-", "_")
    accepted = {202: {"model": Job, "description": "With `Prefer: respond-async`: the job, queued; follow it at "
                                                   "`Location` (`GET /jobs/{id}`)."}}
    app.add_api_route(f"/{op.name}", handler, methods=["POST"], summary=op.summary, response_model=op.result,
                      responses={**responses(op, RESULT_HEADER), **accepted}, openapi_extra=request_body(op))


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
    spec = _with_default_device(spec, settings)
    job = await job_routes.submit(jobs, op.name, spec.model_dump(mode="json", exclude_unset=True))
    if job_routes.wants_async(request):
        return job_routes.accepted(job)
    job = await job_routes.await_job(jobs, job.id, request)
    if job.state == JobState.succeeded:
        return JSONResponse(job.result)
    return job_routes.problem_of(job)


async def _run_upload(op: Operation, request: Request, settings: Settings, jobs: JobService) -> Response:
    """The upload form, through the same queue: the upload is unpacked into the data directory's scratch area
    (``.adapter-surgery/scratch/<id>``, where any worker sees it), the job runs there, the answer is the output."""
    if job_routes.wants_async(request):
        return problems.problem(400, "Bad request", "the upload form answers with the output itself, so it cannot "
                                "run asynchronously (Prefer: respond-async)", field="Prefer",
                                fix="Drop the Prefer header, or place the checkpoint under the data directory and "
                                    "send the JSON form, which can.")
    try:
        declared = int(request.headers.get("content-length") or 0)
    except ValueError:
        return problems.problem(400, "Bad request", "the Content-Length header is not a number",
                                fix="Send a valid Content-Length, or let the client compute it.")
    if declared > settings.max_upload_bytes:
        raise PayloadTooLarge(f"the upload is {declared} bytes; the limit is {settings.max_upload_bytes}",
                              field="file", fix="Use the JSON form with a checkpoint under the data directory.")
    form = await request.form(max_files=1, max_fields=4)
    upload, raw_spec = form.get("file"), form.get("spec") or "{}"
    if not isinstance(upload, UploadFile):
        raise InvalidSpec("the form has no file part", field="file",
                          fix="Send the checkpoint as the 'file' part (.safetensors, .zip or .tar).")
    if not isinstance(raw_spec, str):
        raise InvalidSpec("the spec part must be a JSON text field, not a file", field="spec")
    try:
        options = op.options.model_validate_json(raw_spec)
    except ValidationError as exc:
        return problems.validation_problem(list(exc.errors()), prefix=("spec",))
    work = jobs.scratch_dir / uuid.uuid4().hex
    make_work_dir(work, None)  # owned by this process until the answer is sent; swept if it dies
    try:
        saved = work / "upload.bin"
        with saved.open("wb") as fh:
            await run_in_threadpool(shutil.copyfileobj, upload.file, fh, 1 << 20)
        if saved.stat().st_size > settings.max_upload_bytes:
            raise PayloadTooLarge(f"the upload exceeds {settings.max_upload_bytes} bytes", field="file")
        filename = upload.filename or ""
        checkpoint = await run_in_threadpool(unpack_upload, filename, saved, work, settings.max_upload_bytes)
        spec = op.spec.model_validate({**options.model_dump(), "checkpoint": checkpoint, "output": "output"})
        spec = _with_default_device(spec, settings)
        job = await job_routes.submit(jobs, op.name, spec.model_dump(mode="json", exclude_unset=True),
                                      str(work.relative_to(settings.data_dir)))
        job = await job_routes.await_job(jobs, job.id, request)
        if job.state != JobState.succeeded:
            return job_routes.problem_of(job)
        body, media, name = await run_in_threadpool(pack_output, work / "output", filename)
    finally:
        await run_in_threadpool(shutil.rmtree, work, True)
    header = _result_header(job.result or {})
    return Response(body, media_type=media, headers={RESULT_HEADER: header,
                                                     "Content-Disposition": f'attachment; filename="{name}"'})


def _result_header(result: dict[str, Any]) -> str:
    """The result as ASCII JSON for a response header, at most ``MAX_RESULT_HEADER`` bytes (proxies cap headers
    at 8-16 KB): long lists are cut to their first items (with ``<key>_total``), then dropped if still too long,
    and ``"truncated": true`` says so."""
    def dump(doc: dict[str, Any]) -> str:
        return json.dumps(doc, ensure_ascii=True, separators=(",", ":"))

    text = dump(result)
    if len(text) <= MAX_RESULT_HEADER:
        return text
    short: dict[str, Any] = {"truncated": True}
    for key, value in result.items():
        if isinstance(value, list) and len(value) > 8:
            short[key], short[f"{key}_total"] = value[:8], len(value)
        else:
            short[key] = value
    if len(dump(short)) > MAX_RESULT_HEADER:
        short = {k: v for k, v in short.items() if not isinstance(v, (list, dict))} | {"truncated": True}
    return dump(short)


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory adapter_surgery.api.app:app_from_env``."""
    return create_app()
