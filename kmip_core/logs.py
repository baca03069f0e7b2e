"""Log output of both services, on stderr: text (the default) or JSON lines
(`[logging] format = "json"`).

A JSON line is one object: time (UTC, ISO 8601), level, node, logger,
message, request_id and client (null outside a request), and exception
(the formatted traceback) when there is one. The request id and client come
from `log_context`, which the KMIP dispatcher opens around each request on
its worker thread (contextvars: each thread sees its own), or from a
service's own `context` callable (the broker's request scope). What a line
says is what the log call said: log calls never carry key material, and the
formatter adds nothing but the fields above.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import sys
from collections.abc import Callable

__all__ = ["FORMATS", "TEXT_FORMAT", "JsonFormatter", "configure", "log_context"]

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_CONTEXT: contextvars.ContextVar[tuple[str | None, str | None]] = contextvars.ContextVar(
    "kmip_core_log_context", default=(None, None)
)

LogContext = Callable[[], tuple[str | None, str | None]]


class log_context:  # named as the function it was: `with log_context(...)`
    """Log lines written in the block (on this thread) carry this request
    id and client. A class, not a generator: every request enters one, and
    a generator's context manager costs twice as much (issue 15)."""

    __slots__ = ("_value", "_token")

    def __init__(self, request_id: str | None, client: str | None = None) -> None:
        self._value = (request_id, client)

    def __enter__(self) -> None:
        self._token = _CONTEXT.set(self._value)

    def __exit__(self, *exc: object) -> None:
        _CONTEXT.reset(self._token)


class JsonFormatter(logging.Formatter):
    """One JSON object per record. `context`: a callable giving (request id,
    client) when `log_context` has none (the broker's request scope)."""

    def __init__(self, node: str = "", context: LogContext | None = None):
        super().__init__()
        self.node = node
        self.context = context

    def format(self, record: logging.LogRecord) -> str:
        request_id, client = _CONTEXT.get()
        if request_id is None and self.context is not None:
            try:
                request_id, client = self.context()
            except Exception:
                request_id, client = None, None
        line = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"
            ),
            "level": record.levelname,
            "node": self.node,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or request_id,
            "client": getattr(record, "client", None) or client,
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure(level: str = "INFO", fmt: str = "text", node: str = "", context: LogContext | None = None) -> None:
    """Send the process's logs to stderr in `fmt` ("text" or "json") at
    `level`, replacing any handler set before."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(node, context))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
