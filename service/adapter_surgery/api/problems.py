"""RFC 9457 ``application/problem+json`` answers for every error, never a traceback."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapter_surgery.errors import SurgeryError, validation_problem_body

PROBLEM = "application/problem+json"
log = logging.getLogger("adapter_surgery")


def problem(status: int, title: str, detail: str, headers: dict[str, str] | None = None,
            **extra: object) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def validation_problem(errors: list[dict], prefix: tuple[str, ...] = ()) -> JSONResponse:
    """A 422 naming each invalid field (dotted path) with pydantic's message."""
    return JSONResponse(validation_problem_body(errors, prefix), status_code=422, media_type=PROBLEM)


def install(app: FastAPI) -> None:
    """Register the handlers that turn every exception into a problem+json answer."""

    @app.exception_handler(SurgeryError)
    async def _surgery(_: Request, exc: SurgeryError) -> JSONResponse:
        return JSONResponse(exc.to_problem(), status_code=exc.status, media_type=PROBLEM)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_problem(list(exc.errors()))

    @app.exception_handler(ValidationError)
    async def _validation(_: Request, exc: ValidationError) -> JSONResponse:
        return validation_problem(list(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        fixes = {404: "See GET /docs for the endpoints.", 405: "See GET /docs for each endpoint's method.",
                 400: "Send a well-formed JSON body or multipart form (fields: file, spec)."}
        return problem(exc.status_code, str(exc.detail), f"{request.method} {request.url.path}: {exc.detail}",
                       headers=exc.headers, fix=fixes.get(exc.status_code, "See GET /docs."))  # 405: Allow

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return problem(500, "Internal error", f"{type(exc).__name__}: the service failed unexpectedly; nothing was "
                       "written to the output. Please report it with the request.")
