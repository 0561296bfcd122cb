"""Logging set-up: text or JSON lines, the request id on every line, secrets never written.

The request id lives in a context variable, so every log line emitted while a request is handled
(in the adapters, the pipeline, the engine's async side) carries it without being passed around.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# ?token=... in access-log lines, anything shaped like a bearer credential, and Hugging Face tokens.
# A value written as a <placeholder> is an instruction to the reader ("export HF_TOKEN=<read token>"),
# not a secret: it is matched whole, so that it is left alone rather than cut at its first space.
_SECRET = re.compile(
    r"(?P<prefix>(?:token|api_key|key)=|Bearer\s+)(?P<value><[\w .-]{1,40}>|[^&\s\"']+)"
    r"|(?P<hf>\bhf_[A-Za-z0-9]{20,})",
    re.IGNORECASE,
)
_PLACEHOLDER = re.compile(r"<[\w .-]{1,40}>")


def _hide(match: re.Match) -> str:
    if match.group("hf"):
        return "[redacted]"
    value = match.group("value")
    return match.group(0) if _PLACEHOLDER.fullmatch(value) else match.group("prefix") + "[redacted]"


def redact(text: str) -> str:
    """``text`` with credentials replaced by ``[redacted]``; ``<placeholders>`` in instructions stay."""
    return _SECRET.sub(_hide, text)


class ContextFilter(logging.Filter):
    """Adds ``request_id`` to every record and redacts credentials from the message."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Configure the root logger (and uvicorn's) once, for the CLI."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
