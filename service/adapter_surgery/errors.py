"""Errors the core raises for bad input; the API turns each into an RFC 9457 problem+json answer."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

#: Pydantic puts the tag of the union member it tried into ``loc`` (``str``, ``TokenSpec``, ``literal['a']``, the
#: discriminator value ``extend-vocab``); field names are identifiers, so none of these is one.
UNION_TAG = re.compile(r"^(str|int|float|bool|[A-Z]\w*|.*\[.*\]|.*-.*)$")


def field_errors(errors: Iterable[Mapping[str, Any]], prefix: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Pydantic validation errors as ``{"field": "tokens.0.content", "message", "type"}``, union tags removed."""
    items = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p != "body" and not (isinstance(p, str) and UNION_TAG.match(p))]
        items.append({"field": ".".join([*prefix, *loc]) or "body", "message": e.get("msg", "invalid"),
                      "type": e.get("type")})
    return items


class SurgeryError(Exception):
    """A request the service refuses, with what is wrong and how to fix it.

    Attributes:
        status: the HTTP status the API answers with (4xx for bad input).
        title: a short, fixed summary of the kind of problem.
        detail: what exactly is wrong, naming the file, tensor or value.
        field: the request field at fault (dotted path), when one is.
        fix: what the caller should change.
    """

    status = 422
    title = "Unprocessable request"

    def __init__(self, detail: str, *, field: str | None = None, fix: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field
        self.fix = fix

    def reword(self, detail: str, *, fix: str | None, field: str | None = None) -> None:
        """Replace what the problem says (``str(exc)`` kept in step), and its ``field`` when one is given."""
        self.detail, self.fix, self.args = detail, fix, (detail,)
        if field is not None:
            self.field = field

    def to_problem(self) -> dict[str, object]:
        problem: dict[str, object] = {
            "type": f"https://adapter-surgery.dev/problems/{type(self).__name__}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if self.field is not None:
            problem["field"] = self.field
        if self.fix is not None:
            problem["fix"] = self.fix
        return problem


class InvalidCheckpoint(SurgeryError):
    """The checkpoint is malformed: bad header, bad index, missing shard, unsupported format."""

    title = "Invalid checkpoint"


class InvalidSpec(SurgeryError):
    """The request's values are inconsistent with each other or with the checkpoint."""

    title = "Invalid request"


class NotFound(SurgeryError):
    status = 404
    title = "Not found"


class OutputExists(SurgeryError):
    status = 409
    title = "Output exists"


class PathOutsideDataDir(SurgeryError):
    status = 403
    title = "Path outside the data directory"


class PayloadTooLarge(SurgeryError):
    status = 413
    title = "Upload too large"


class RequestTooLarge(PayloadTooLarge):
    """The request body (JSON, or a form field) exceeds its limit."""

    title = "Request too large"


class BadRequest(SurgeryError):
    """The request cannot be parsed at all (malformed multipart, missing boundary, too many parts)."""

    status = 400
    title = "Bad request"


class Unauthorized(SurgeryError):
    """No bearer token, or not the configured one; answered with ``WWW-Authenticate: Bearer``."""

    status = 401
    title = "Unauthorized"


class NotEnoughMemory(SurgeryError):
    """The job's memory estimate exceeds what the process may still allocate (its cgroup limit, or
    ``ADAPTER_SURGERY_MEMORY_LIMIT_BYTES``); refused before any work. ``field``: the request field that drives it."""

    status = 503
    title = "Not enough memory"


def validation_problem_body(errors: Iterable[Mapping[str, Any]], prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    """The problem+json body of a 422 for pydantic errors: the first field at fault, every error, the fix."""
    items = field_errors(errors, prefix)
    first = items[0] if items else {"field": "body", "message": "invalid"}
    return {"type": "about:blank", "title": "Invalid request", "status": 422,
            "detail": "; ".join(f"{i['field']}: {i['message']}" for i in items[:5]), "field": first["field"],
            "errors": items, "fix": "Correct the named field(s); GET /docs (or openapi/openapi.json) lists every "
                                    "field with its type."}


class Cancelled(SurgeryError):
    """The job was cancelled (``DELETE /jobs/{id}``, or the client of a synchronous request went away)."""

    status = 409
    title = "Cancelled"


class DiskFull(SurgeryError):
    """The output's filesystem is full (ENOSPC), over quota (EDQUOT) or over the file-size limit (EFBIG)."""

    status = 507
    title = "Insufficient storage"


class QueueFull(SurgeryError):
    """The job queue holds ``max_queue`` pending jobs; the API answers 429 with ``Retry-After``."""

    status = 429
    title = "Too many jobs"

    def __init__(self, detail: str, *, retry_after: int = 5, field: str | None = None, fix: str | None = None) -> None:
        super().__init__(detail, field=field, fix=fix)
        self.retry_after = retry_after


class JobStoreUnavailable(SurgeryError):
    """The job store (the queue's Redis, or its SQLite file) cannot be reached or refuses the request (503)."""

    status = 503
    title = "Job store unavailable"


class NoWorker(SurgeryError):
    """A request that waits for its result, sent to a service whose jobs run on separate workers (Redis queue) while
    none is running: it would wait for ever (503)."""

    status = 503
    title = "No worker"
