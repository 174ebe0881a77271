"""The OpenAPI document: generated from ``OPERATIONS`` and the routes, completed with what FastAPI cannot infer.

What a client generator or a fuzzer needs is all in it:

- ``operationId`` = the operation's name in snake case (``extend_vocab``; other routes: their function's name,
  ``healthz``): openapi-python-client and openapi-generator turn it into the method name as it is, where FastAPI's
  default (``extend_vocab_extend_vocab_post``) repeats the path and the method.
- tags: ``operations`` (the patching endpoints), ``jobs`` (``/jobs``), ``service`` (health, readiness, metrics).
- every request body has the README's example, for the JSON body and for the upload form; the form's ``spec``
  part is the operation's options schema (sent as ``application/json``), its answers are binary
  (``application/octet-stream``, ``application/zip``, ``application/x-tar``) with the result JSON in the
  ``X-Adapter-Surgery-Result`` header.
- every status the server answers is declared with the ``Problem`` schema (``application/problem+json``), with
  the headers that come with it (``Retry-After`` on 429, ``WWW-Authenticate`` on 401, ``Allow`` on 405); FastAPI's
  ``HTTPValidationError`` is replaced, since the service answers problem+json for those too.
- ``Prefer: respond-async`` on every operation, and its ``202`` answer: the ``Job`` (``adapter_surgery.jobs``) and
  ``Location: /jobs/{id}``.
- a bearer ``securityScheme`` required everywhere but ``/healthz`` and ``/readyz``.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel

from adapter_surgery.ops import OPERATIONS, Operation

RESULT_HEADER = "X-Adapter-Surgery-Result"
PROBLEM_TYPE = "application/problem+json"
#: Media types of the upload form's answer: a single .safetensors file, or the model directory as an archive.
BINARY_TYPES = ("application/octet-stream", "application/zip", "application/x-tar")
#: Routes that need no token (probes of orchestrators).
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
SECURITY_SCHEME = "bearerAuth"

TAGS = [
    {"name": "operations", "description": "Patch a checkpoint: JSON with paths under the data directory, or the "
                                          "upload form for small models. `Prefer: respond-async` runs it as a job."},
    {"name": "jobs", "description": "Operations run as jobs: state, progress, result or problem; cancel."},
    {"name": "service", "description": "Liveness, readiness and metrics."},
]

#: The README's request for each operation (JSON body). The upload form's ``spec`` is the same without the paths.
EXAMPLES: dict[str, dict[str, Any]] = {
    "extend-vocab": {
        "checkpoint": "SmolLM2-135M-Instruct", "output": "SmolLM2-135M-Instruct-tools",
        "tokens": [{"content": "<|tool_call|>", "special": True}, {"content": "<|tool_result|>", "special": True},
                   {"content": "photosynthesis", "init": "subword_mean"},
                   {"content": "<think>", "init": {"strategy": "copy", "source": "think"}}],
        "init": "mean", "pad_to_multiple_of": 64, "reinit_existing": False, "seed": 0, "device": "auto",
        "overwrite": False},
    "attach-lora": {
        "checkpoint": "SmolLM2-135M-Instruct-tools", "output": "SmolLM2-lora", "r": 16, "lora_alpha": 32,
        "target_modules": "all-linear", "init_lora_weights": True, "trainable_token_indices": [49152, 49153],
        "seed": 0},
    "attach-head": {
        "checkpoint": "SmolLM2-135M-Instruct", "output": "SmolLM2-sentiment", "task": "sequence_classification",
        "id2label": ["negative", "positive"], "init": "kaiming_normal", "pad_token": "auto", "seed": 0},
    "surgery": {
        "checkpoint": "SmolLM2-135M-Instruct", "output": "SmolLM2-tools-classifier", "verify": True,
        "steps": [{"op": "extend-vocab", "tokens": ["<|tool_call|>", "<|tool_result|>"]},
                  {"op": "attach-head", "num_labels": 3, "pad_token": "add"},
                  {"op": "attach-lora", "r": 16, "lora_alpha": 32, "target_modules": "all-linear",
                   "trainable_token_indices": "added"}]},
    "expand-blocks": {
        "checkpoint": "SmolLM2-135M-Instruct", "output": "SmolLM2-pro", "num_blocks": 6, "positions": "interleave",
        "init": "zero", "seed": 0, "verify": True},
    "merge-lora": {
        "checkpoint": "SmolLM2-135M-Instruct", "output": "SmolLM2-merged",
        "adapters": [{"path": "SmolLM2-lora-trained", "weight": 1.0}, {"path": "SmolLM2-lora-style", "weight": 0.5}],
        "safe_merge": True, "device": "auto"},
    "convert-adapter": {
        "adapter": "SmolLM2-pissa-trained", "initial_adapter": "SmolLM2-pissa", "base": "SmolLM2-135M-Instruct",
        "output": "SmolLM2-pissa-as-lora"},
    "verify": {
        "checkpoint": "SmolLM2-135M-Instruct", "patched": "SmolLM2-135M-Instruct-tools", "num_probes": 4,
        "probe_length": 16, "seed": 0, "text": "The capital of France is"},
}
#: The README's upload-form examples (``spec`` part); operations not named here use their JSON example's options.
FORM_EXAMPLES: dict[str, dict[str, Any]] = {"extend-vocab": {"num_new_tokens": 8}}


def takes_upload(op: Operation) -> bool:
    """Whether the operation has the upload form: one checkpoint in, one output back (not ``/verify``)."""
    return "output" in op.spec.model_fields and getattr(op, "upload", True)


def json_example(op: Operation) -> dict[str, Any]:
    return copy.deepcopy(EXAMPLES[op.name])


def form_example(op: Operation) -> dict[str, Any]:
    """The ``spec`` part of the upload form's example."""
    if op.name in FORM_EXAMPLES:
        return copy.deepcopy(FORM_EXAMPLES[op.name])
    return {k: v for k, v in json_example(op).items() if k not in ("checkpoint", "output", "overwrite")}


def _problem(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description,
                              "content": {PROBLEM_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
    if headers:
        answer["headers"] = headers
    return answer


def _header(description: str, required: bool = True, **schema: Any) -> dict[str, Any]:
    return {"description": description, "required": required, "schema": {"type": "string"} | schema}


def request_body(op: Operation) -> dict[str, Any]:
    """``openapi_extra`` of an operation's route: operationId, tag, ``Prefer`` and the request body(ies)."""
    content: dict[str, Any] = {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{op.spec.__name__}"},
        "examples": {"readme": {"summary": "The README's example", "value": json_example(op)}}}}
    if takes_upload(op):
        content["multipart/form-data"] = {
            "schema": {"type": "object", "required": ["file"], "additionalProperties": False, "properties": {
                "file": {"type": "string", "format": "binary",
                         "description": "A .safetensors file, or a .zip/.tar of a model directory."},
                "spec": {"$ref": f"#/components/schemas/{op.options.__name__}",
                         "description": f"{op.options.__name__} as JSON: the spec without checkpoint/output "
                                        "(default: {})."}}},
            "encoding": {"spec": {"contentType": "application/json"}},
            "examples": {"readme": {"summary": "The README's upload example (file: the model)",
                                    "value": {"file": "model.safetensors", "spec": form_example(op)}}}}
    return {
        "operationId": op.name.replace("-", "_"),
        "tags": ["operations"],
        "parameters": [{
            "name": "Prefer", "in": "header", "required": False,
            "description": "`respond-async`: answer 202 at once with the job (Location: /jobs/{id}) instead of "
                           "waiting for the result (RFC 7240).",
            "schema": {"type": "string"}, "example": "respond-async"}],
        "requestBody": {"required": True, "content": content},
    }


def responses(op: Operation, result_header: str = RESULT_HEADER) -> dict[int | str, dict[str, Any]]:
    """The answers of an operation's route, besides those every route shares (:func:`build_openapi`)."""
    ok: dict[str, Any] = {"description": "The result (JSON body)."}
    if takes_upload(op):
        ok = {"description": f"JSON body: the result. Upload form: the patched file (.safetensors) or the output "
                             f"directory as an archive of the uploaded kind, with the result JSON in the "
                             f"{result_header} header.",
              "content": {t: {"schema": {"type": "string", "format": "binary"}} for t in BINARY_TYPES},
              "headers": {
                  result_header: _header(
                      f"Upload form only: the result ({op.result.__name__}) as ASCII JSON, at most 7 KiB (long "
                      'lists cut to their first items with "<key>_total", "truncated": true, and "job": the id whose '
                      'GET /jobs/{id} answers the whole result).', False),
                  "Content-Disposition": _header("Upload form only: attachment; filename=...", False)}}
    return {
        200: ok,
        202: {"description": "`Prefer: respond-async`: the job, queued; poll its Location.",
              "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Job"}}},
              "headers": {"Location": _header("/jobs/{id}: the job's URL."),
                          "Preference-Applied": _header("respond-async", False)}},
        400: _problem("Malformed request: bad multipart (no boundary, too many fields or files), bad "
                      "Content-Length."),
        403: _problem("A path resolves outside the data directory."),
        404: _problem("The checkpoint does not exist."),
        409: _problem("The output exists and overwrite is false, or the job was cancelled."),
        413: _problem("The body or the upload (archive contents included) is too large."),
        415: _problem("Neither JSON nor multipart form data" + ("." if takes_upload(op) else
                                                                 " (this operation takes JSON only).")),
        422: _problem("Invalid request or checkpoint; names the field and the fix."),
        429: _problem("The job queue is full; retry after Retry-After seconds.",
                      {"Retry-After": _header("Seconds to wait before retrying.", type="integer", minimum=0)}),
        503: _problem("Not enough memory for this request (the estimate exceeds what is available), the job store "
                      "(Redis, the queue's SQLite file) cannot be reached, or (Redis queue) no worker runs to answer "
                      "a request that waits for its result."),
        507: _problem("The disk is full (ENOSPC/EDQUOT); nothing was left at the output (or the job record or upload "
                      "could not be written in the data directory)."),
    }


PROBLEM_SCHEMA = {
    "type": "object", "title": "Problem",
    "description": "RFC 9457 problem details; field names the request field at fault, fix says what to change.",
    "properties": {
        "type": {"type": "string", "description": "A URI naming the kind of problem (about:blank if none)."},
        "title": {"type": "string"}, "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string"}, "field": {"type": "string", "description": "Dotted path of the field."},
        "fix": {"type": "string", "description": "What to change."},
        "errors": {"type": "array", "description": "Every invalid field (422 from validation).", "items": {
            "type": "object", "properties": {"field": {"type": "string"}, "message": {"type": "string"},
                                             "type": {"type": ["string", "null"]}}}}},
    "required": ["title", "status", "detail"],
}

#: Until ``adapter_surgery.jobs`` exists: the job as issue 8 describes it.
JOB_PLACEHOLDER: dict[str, Any] = {
    "type": "object", "title": "Job", "description": "An operation run as a job.",
    "required": ["id", "operation", "state", "progress", "created_at"],
    "properties": {
        "id": {"type": "string"}, "operation": {"type": "string"},
        "state": {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
        "progress": {"type": "object", "properties": {
            "fraction": {"type": "number", "minimum": 0, "maximum": 1}, "stage": {"type": "string"},
            "done": {"type": "integer"}, "total": {"type": "integer"}, "unit": {"type": "string"}}},
        "created_at": {"type": "string", "format": "date-time"},
        "started_at": {"type": ["string", "null"], "format": "date-time"},
        "finished_at": {"type": ["string", "null"], "format": "date-time"},
        "result": {"type": ["object", "null"]}, "problem": {"type": ["object", "null"]}},
}


def _job_model() -> type[BaseModel] | None:
    """``adapter_surgery.jobs.Job`` when the jobs package is there."""
    if importlib.util.find_spec("adapter_surgery.jobs") is None:
        return None
    model = getattr(importlib.import_module("adapter_surgery.jobs"), "Job", None)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _add_model(components: dict[str, Any], model: type[BaseModel], mode: str = "validation") -> None:
    js = model.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)  # type: ignore[arg-type]
    components.update(js.pop("$defs", {}))
    components[model.__name__] = js


def _common_responses(path: str, secured: bool) -> dict[str, Any]:
    """Answers every route can give: 405 for another method, 401 without the token."""
    common: dict[str, Any] = {"405": _problem("Another method than those the path takes.",
                                              {"Allow": _header("The methods the path takes.")})}
    if secured:
        common["401"] = _problem("The bearer token is missing or wrong (when the service has one).",
                                 {"WWW-Authenticate": _header("Bearer")})
    if "{" in path:
        common["404"] = _problem("No such resource.")
    return common


def _tag(path: str) -> str:
    if path.lstrip("/") in OPERATIONS:
        return "operations"
    return "jobs" if path == "/jobs" or path.startswith("/jobs/") else "service"


def build_openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes,
                         tags=TAGS)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for op in OPERATIONS.values():
        for model in (op.spec, op.options):
            _add_model(components, model)
    components["Problem"] = PROBLEM_SCHEMA
    job = _job_model()
    if job is not None:
        _add_model(components, job, "serialization")
    else:
        components["Job"] = JOB_PLACEHOLDER
    schema["components"]["securitySchemes"] = {SECURITY_SCHEME: {
        "type": "http", "scheme": "bearer",
        "description": "ADAPTER_SURGERY_API_TOKEN (or _FILE): when the service has a token, every route but "
                       "/healthz and /readyz requires `Authorization: Bearer <token>`."}}
    schema["security"] = [{SECURITY_SCHEME: []}, {}]  # optional: a service without a token takes anonymous calls
    names = {(r.path, m.lower()): r.name for r in app.routes if isinstance(r, APIRoute) for m in r.methods}
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            name = names.get((path, method))
            if name and operation.get("operationId", "").endswith(f"_{method}"):  # FastAPI's default id
                operation["operationId"] = name
            operation.setdefault("tags", [_tag(path)])
            secured = path not in OPEN_PATHS
            if not secured:
                operation["security"] = []
            answers = operation["responses"]
            for status, answer in answers.items():  # FastAPI's 422 boilerplate: the service answers a problem
                if "HTTPValidationError" in str(answer.get("content", "")):
                    answers[status] = _problem("Invalid parameters; names the field and the fix.")
            for status, answer in _common_responses(path, secured).items():
                answers.setdefault(status, answer)
    if "HTTPValidationError" not in str(schema["paths"]):
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
    app.openapi_schema = schema
    return schema
