"""Logging: one JSON object per line (stdlib ``logging``), set up by the commands that run the service, never at
import time. Every record logged while a request is served carries its ``request_id``; fields passed with
``extra={...}`` (``job_id``, ``method``, ``status``...) become keys of the JSON object.

Everything logs through the ``adapter_surgery`` logger or its children (``adapter_surgery.access``: one line per
request).
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime

LOGGER = "adapter_surgery"
#: The id of the request being served in this context (set by the request-id middleware).
request_id: ContextVar[str | None] = ContextVar("adapter_surgery_request_id", default=None)

#: Attributes every ``LogRecord`` has; anything else on a record came from ``extra=`` and is logged as a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName",
                                                                              "color_message"}  # uvicorn's ANSI copy


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", "request_id"?, <extra fields>..., "exc_info"?}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = request_id.get()
        if rid is not None:
            doc["request_id"] = rid
        doc.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            doc["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


def configure_logging(json_lines: bool = True, level: int | str = logging.INFO) -> None:
    """Send the root logger's records to stderr, as JSON lines or plain text (replaces earlier handlers, so calling
    it twice does not double the lines). Used by ``serve`` (and the worker), not at import."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):  # let uvicorn's records reach the root handler
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
