"""Pure ASGI middleware (streaming bodies and client disconnects pass through untouched):

- ``RequestContext`` (outermost): the request id (``X-Request-ID`` from the request when it is short and printable,
  else a new one), echoed on every answer and put in every log record of the request; one JSON access-log line
  per request; the request metrics (by route template and status).
- ``BearerAuth``: when a token is configured, every route but ``/healthz`` and ``/readyz`` requires
  ``Authorization: Bearer <token>`` (compared in constant time), else ``401`` with ``WWW-Authenticate: Bearer``.
- ``BodyLimit``: a body over its limit is ``413``, from ``Content-Length`` before anything is read, and while a
  body without one (chunked) is received: the application never gets more than the limit plus one chunk.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from collections.abc import Callable, Sequence

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapter_surgery import logs
from adapter_surgery.api.problems import PROBLEM, problem
from adapter_surgery.errors import BadRequest, PayloadTooLarge, RequestTooLarge, SurgeryError, Unauthorized
from adapter_surgery.settings import Settings

REQUEST_ID_HEADER = "X-Request-ID"
#: A request id from the client is kept when it is 1-128 printable ASCII characters without spaces.
VALID_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
#: Routes open without a token (probes of orchestrators).
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
BEARER_SCHEME = "bearerAuth"
access_log = logging.getLogger(f"{logs.LOGGER}.access")

#: ``observe(method, route, status, seconds)``: records one finished request (the metrics).
Observer = Callable[[str, str, int, float], None]


def resolve_token(settings: Settings) -> str | None:
    """The configured bearer token: ``api_token``, or the contents of ``api_token_file`` without the trailing
    newline; ``None`` when neither is set.

    Raises:
        ValueError: both are set, the file cannot be read, or the token is empty, not printable ASCII, or padded
            with whitespace (no client could send it).
    """
    if settings.api_token is not None and settings.api_token_file is not None:
        raise ValueError("set ADAPTER_SURGERY_API_TOKEN or ADAPTER_SURGERY_API_TOKEN_FILE, not both")
    if settings.api_token is not None:
        token = settings.api_token.get_secret_value()
    elif settings.api_token_file is not None:
        try:
            token = settings.api_token_file.read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"ADAPTER_SURGERY_API_TOKEN_FILE {settings.api_token_file} cannot be read: {exc}") \
                from None
    else:
        return None
    if not token.strip():
        raise ValueError("the API token is empty; unset it to run without authentication")
    bad = next((c for c in token if not (c.isascii() and c.isprintable())), None)
    if bad is not None:  # HTTP clients send header values as bytes, servers read them as latin-1: never equal
        raise ValueError(f"the API token contains {'a non-ASCII' if not bad.isascii() else 'a non-printable'} "
                         f"character (U+{ord(bad):04X}), so no client could send it in an Authorization header; "
                         "use printable ASCII only (e.g. `openssl rand -hex 32`)")
    if token != token.strip():
        raise ValueError("the API token starts or ends with whitespace, which HTTP drops from header values; "
                         "remove it")
    return token


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def route_template(scope: Scope, routes: Sequence[BaseRoute]) -> str:
    """The path template of the route that served (or would serve) the request, ``<unmatched>`` for none: a
    bounded label set for the metrics, whatever paths clients send."""
    route = scope.get("route")
    if route is None:
        for candidate in routes:
            match, _ = candidate.matches(scope)
            if match is not Match.NONE:
                route = candidate
                break
    return getattr(route, "path", None) or "<unmatched>"


class RequestContext:
    """Request id, access log and request metrics; see the module docstring."""

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute] = (), observe: Observer | None = None) -> None:
        self.app, self.routes, self.observe = app, routes, observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        rid = given if given is not None and VALID_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        logs.request_id.set(rid)  # not reset: the server's own error log of this request (after us) carries it too
        scope.setdefault("state", {})["request_id"] = rid
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started, status = True, message["status"]
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode("latin-1"))]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if not response_started:  # answer the problem here, so that it carries the request id
                await problem(500, "Internal error", "the service failed unexpectedly; nothing was written to the "
                              "output. Please report it with the request id.",
                              request_id=rid)(scope, receive, send_with_id)
            raise
        finally:
            seconds = time.perf_counter() - started
            route = route_template(scope, self.routes)
            client = scope.get("client")
            access_log.info("%s %s %d", scope["method"], scope["path"], status, extra={
                "method": scope["method"], "path": scope["path"], "route": route, "status": status,
                "duration_ms": round(seconds * 1000, 3), "client": f"{client[0]}:{client[1]}" if client else None})
            if self.observe is not None:
                self.observe(scope["method"], route, status, seconds)


class BearerAuth:
    """``Authorization: Bearer <token>`` on every route but ``OPEN_PATHS``; see the module docstring."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app, self.token = app, token.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        exc = Unauthorized("this service requires a bearer token", field="Authorization",
                           fix="Send 'Authorization: Bearer <token>' with the service's token "
                               "(ADAPTER_SURGERY_API_TOKEN).")
        await _answer(exc, {"WWW-Authenticate": "Bearer"})(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        value = _header(scope, b"authorization") or ""
        scheme, _, given = value.partition(" ")
        # compare_digest on bytes: its time does not depend on where the first difference is
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8"), self.token)


class BodyLimit:
    """413 for a body over its limit: ``max_upload`` for multipart form data, ``max_json`` for anything else."""

    def __init__(self, app: ASGIApp, max_json: int, max_upload: int) -> None:
        self.app, self.max_json, self.max_upload = app, max_json, max_upload

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctype = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
        upload = ctype == "multipart/form-data"
        limit = self.max_upload if upload else self.max_json

        def too_large(detail: str) -> PayloadTooLarge:
            if upload:
                return PayloadTooLarge(detail, field="file",
                                       fix="Use the JSON form with a checkpoint under the data directory.")
            return RequestTooLarge(detail, field="body", fix="Send a smaller JSON body: lists of thousands of "
                                   "items belong in a file under the data directory.")

        declared = _header(scope, b"content-length")
        if declared is not None and not declared.strip().isdigit():
            await _answer(BadRequest("the Content-Length header is not a number", field="Content-Length",
                                     fix="Send a valid Content-Length, or let the client compute it."))(
                scope, receive, send)
            return
        if declared is not None and int(declared) > limit:
            exc = too_large(f"the request body is {int(declared)} bytes; the limit is {limit}")
            await _answer(exc)(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large(f"the request body exceeds the limit of {limit} bytes")
            return message

        await self.app(scope, counting_receive, send)


def _answer(exc: SurgeryError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(exc.to_problem(), status_code=exc.status, media_type=PROBLEM, headers=headers)


def install(app: FastAPI, settings: Settings, observe: Observer | None = None) -> None:
    """Add the middleware to ``app`` (outermost first: request context, auth, body limit).

    Raises:
        ValueError: the token settings are unusable (see ``resolve_token``).
    """
    app.add_middleware(BodyLimit, max_json=settings.max_json_bytes, max_upload=settings.max_upload_bytes)
    token = resolve_token(settings)
    if token is not None:
        app.add_middleware(BearerAuth, token=token)
    app.add_middleware(RequestContext, routes=app.router.routes, observe=observe)
