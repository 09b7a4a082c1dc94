"""The service's log lines: text or JSON, each with time, level, logger and
request id; and the access log, one line per request.

:func:`configure_logging` sets up the ``lora_ckpt`` and ``uvicorn`` loggers
(uvicorn's own access log is replaced by :class:`AccessLog`). The request id
comes from the client's ``x-request-id`` header when it is a short token,
else it is made here; it is answered in ``x-request-id`` and carried by every
line logged while the request runs (a context variable).
"""

import contextvars
import json
import logging
import re
import sys
import time
import uuid

__all__ = ["AccessLog", "configure_logging"]


REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
ACCESS_LOGGER = "lora_ckpt.access"
_TOKEN = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_LEVELS = {"trace": 5, "debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (ISO 8601, UTC), ``level``,
    ``logger``, ``request_id``, ``message``, the access fields if any, and
    ``exception`` with its traceback."""

    FIELDS = ("method", "path", "status", "duration_ms", "client", "bytes")

    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        for field in self.FIELDS:
            if hasattr(record, field):
                document[field] = getattr(record, field)
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def configure_logging(level: str = "warning", fmt: str = "text", stream=None) -> None:
    """Sends the ``lora_ckpt`` and ``uvicorn`` loggers to ``stream`` in ``fmt``.

    The access log (logger ``lora_ckpt.access``) is at ``info`` and shown
    unless ``level`` is ``error`` or ``critical``.

    Args:
        level: The log level (one of uvicorn's names).
        fmt: ``"text"`` or ``"json"``.
        stream: Where lines go (default: stderr).
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        formatter = logging.Formatter(TEXT_FORMAT)
        formatter.converter = time.gmtime
        formatter.default_msec_format = "%s.%03dZ"
        handler.setFormatter(formatter)
    numeric = _LEVELS.get(level, logging.WARNING)
    for name in ("lora_ckpt", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(numeric)
        logger.propagate = False
    access = logging.getLogger(ACCESS_LOGGER)
    access.handlers[:] = [handler]
    access.setLevel(logging.INFO if numeric <= logging.WARNING else numeric)
    access.propagate = False
    logging.getLogger("uvicorn.access").disabled = True  # AccessLog writes these lines


def _request_id_of(headers) -> str:
    """The client's ``x-request-id`` if it is a short token, else a new id."""
    for key, value in headers:
        if key == b"x-request-id":
            text = value.decode("latin-1")
            if _TOKEN.fullmatch(text):
                return text
    return uuid.uuid4().hex[:16]


class AccessLog:
    """ASGI middleware: a request id for each HTTP request (answered in
    ``x-request-id``) and one access-log line when it ends.

    Args:
        app: The ASGI app.
    """

    def __init__(self, app):
        self.app = app
        self.log = logging.getLogger(ACCESS_LOGGER)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = _request_id_of(scope.get("headers", ()))
        token = REQUEST_ID.set(request_id)
        started = time.perf_counter()
        answer = {"status": 500, "bytes": 0}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
                headers = list(message.get("headers", ()))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                answer["bytes"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            duration = round((time.perf_counter() - started) * 1000, 2)
            client = scope.get("client")
            fields = {
                "method": scope.get("method"),
                "path": scope.get("path"),
                "status": answer["status"],
                "duration_ms": duration,
                "client": f"{client[0]}:{client[1]}" if client else "-",
                "bytes": answer["bytes"],
            }
            self.log.info(
                "%s %s %s %.1f ms",
                fields["method"],
                fields["path"],
                fields["status"],
                duration,
                extra=fields,
            )
            REQUEST_ID.reset(token)
