"""RFC 9457 ``application/problem+json`` answers for every error, never a traceback."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapter_surgery.errors import SurgeryError, field_errors

PROBLEM = "application/problem+json"
log = logging.getLogger("adapter_surgery")


def problem(status: int, title: str, detail: str, **extra: object) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM)


def validation_problem(errors: list[dict], prefix: tuple[str, ...] = ()) -> JSONResponse:
    """A 422 naming each invalid field (dotted path) with pydantic's message."""
    items = field_errors(errors, prefix)
    first = items[0] if items else {"field": "body", "message": "invalid"}
    detail = "; ".join(f"{i['field']}: {i['message']}" for i in items[:5])
    return problem(422, "Invalid request", detail, field=first["field"], errors=items,
                   fix="Correct the named field(s); GET /docs lists every field with its type.")


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
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem(exc.status_code, str(exc.detail), str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return problem(500, "Internal error", f"{type(exc).__name__}: the service failed unexpectedly; nothing was "
                       "written to the output. Please report it with the request.")
