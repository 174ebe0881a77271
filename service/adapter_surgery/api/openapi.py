"""The OpenAPI document: generated from ``OPERATIONS`` and the routes, completed with what FastAPI cannot infer
(the upload form, problem answers)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from adapter_surgery.ops import OPERATIONS, Operation


def request_body(op: Operation) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{op.spec.__name__}"}},
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {
                "file": {"type": "string", "format": "binary",
                         "description": "A .safetensors file, or a .zip/.tar of a model directory."},
                "spec": {"type": "string", "description": f"JSON of {op.options.__name__} (the spec without "
                                                          "checkpoint/output)."}}}}}}}


def responses(op: Operation, result_header: str) -> dict[int | str, dict[str, Any]]:
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    return {
        200: {"description": f"JSON: the result. Upload form: the patched file or archive, the result JSON in the "
                             f"{result_header} header.",
              "content": {"application/octet-stream": {}, "application/zip": {}, "application/x-tar": {}}},
        403: {"description": "A path resolves outside the data directory.", "content": problem},
        404: {"description": "The checkpoint does not exist.", "content": problem},
        409: {"description": "The output exists and overwrite is false.", "content": problem},
        413: {"description": "The upload is too large.", "content": problem},
        415: {"description": "Neither JSON nor multipart form data.", "content": problem},
        422: {"description": "Invalid request or checkpoint; names the field and the fix.", "content": problem},
    }


PROBLEM_SCHEMA = {
    "type": "object", "title": "Problem",
    "description": "RFC 9457 problem details; field names the request field at fault, fix says what to change.",
    "properties": {k: {"type": t} for k, t in [("type", "string"), ("title", "string"), ("status", "integer"),
                                                ("detail", "string"), ("field", "string"), ("fix", "string")]}
    | {"errors": {"type": "array", "items": {"type": "object"}}},
    "required": ["title", "status", "detail"],
}


def build_openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for op in OPERATIONS.values():
        for model in (op.spec, op.options):
            js = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(js.pop("$defs", {}))
            components[model.__name__] = js
    components["Problem"] = PROBLEM_SCHEMA
    app.openapi_schema = schema
    return schema
