"""Logging set-up: text or JSON lines, the request id on every line, secrets never written.

The request id lives in a context variable, so every log line emitted while a request is handled
(in the API adapters, the speech layer, the engine's async side) carries it without being passed around.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from urllib.parse import unquote_plus

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

#: Query parameters that carry credentials, by their *decoded* name (``%74oken`` is ``token``).
SECRET_PARAMS = {"token", "api_key", "apikey", "key", "access_token"}
# A value written as a <placeholder> is an instruction to the reader ("export HF_TOKEN=<read token>"),
# not a secret: it is matched whole, so that it is left alone rather than cut at its first space.
_PLACEHOLDER = r"<[\w .-]{1,40}>"
# A query parameter (name=value, the name possibly percent-encoded), a bearer credential, a Hugging Face token.
_PARAM = re.compile(rf"(?P<name>[^?&;=\s\"'/]+)=(?P<value>{_PLACEHOLDER}|[^&;\s\"']*)")
_BEARER = re.compile(rf"(?P<prefix>Bearer\s+)(?P<value>{_PLACEHOLDER}|[^\s\"']+)", re.IGNORECASE)
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}")
# C0/C1 controls, DEL, and line/paragraph separators: nothing a client sends may start a log line.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
MAX_ID_CHARS = 128
#: A text log line; ``request_tag`` is `` [<request id>]`` while a request is handled, else empty.
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"


def _is_placeholder(value: str) -> bool:
    return re.fullmatch(_PLACEHOLDER, value) is not None


def _redact_param(match: re.Match) -> str:
    name = unquote_plus(match.group("name")).lower()
    if name not in SECRET_PARAMS or _is_placeholder(match.group("value")):
        return match.group(0)
    return f"{match.group('name')}=[redacted]"


def _redact_bearer(match: re.Match) -> str:
    return match.group(0) if _is_placeholder(match.group("value")) else match.group("prefix") + "[redacted]"


def redact(text: str) -> str:
    """``text`` with query-string credentials (whatever the encoding of their name), bearer tokens and
    Hugging Face tokens replaced by ``[redacted]``; ``<placeholders>`` in instructions stay."""
    if "=" in text:
        text = _PARAM.sub(_redact_param, text)
    return _HF_TOKEN.sub("[redacted]", _BEARER.sub(_redact_bearer, text))


def clean_id(value: str | None) -> str | None:
    """A client-chosen id made safe for a log line: control characters replaced, at most 128 characters."""
    if value is None:
        return None
    return _CONTROL.sub("?", value[:MAX_ID_CHARS]) or None


class ContextFilter(logging.Filter):
    """Adds ``request_id`` to every record (and ``request_tag``: `` [id]``, or nothing when there is
    none, for text lines) and redacts credentials from the message."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = clean_id(request_id.get())
        record.request_tag = f" [{record.request_id}]" if record.request_id is not None else ""
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        return True


class RateLimit(logging.Filter):
    """At most ``burst`` warnings per message template per ``window_s`` from the server's plumbing
    (``asyncio``'s accept loop, uvicorn's protocol errors): a flood of bad connections must not
    become a flood of log. The first record after a quiet window says how many were dropped."""

    LOGGERS = ("asyncio", "uvicorn.error")

    def __init__(self, burst: int = 10, window_s: float = 10.0, clock=time.monotonic):
        super().__init__()
        self.burst, self.window_s, self.clock = burst, window_s, clock
        self._seen: dict[tuple[str, str], list] = {}  # (logger, template) -> [window start, count, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not record.name.startswith(self.LOGGERS):
            return True
        now = self.clock()
        key = (record.name, str(record.msg)[:200])
        entry = self._seen.get(key)
        if entry is None or now - entry[0] >= self.window_s:
            dropped = entry[2] if entry is not None else 0
            if len(self._seen) > 1000:
                self._seen.clear()
            self._seen[key] = [now, 1, 0]
            if dropped:
                record.msg, record.args = f"{record.getMessage()} ({dropped} more like this were not logged)", ()
            return True
        entry[1] += 1
        if entry[1] > self.burst:
            entry[2] += 1
            return False
        return True


class DropMessages(logging.Filter):
    """Drops the records whose message matches ``pattern``: attached to one third-party logger, it
    silences one known warning and lets every other record of that logger through."""

    def __init__(self, pattern: re.Pattern):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.match(record.getMessage()) is None


#: Third-party warnings an operator can do nothing about, by the logger that emits them. transformers
#: checks CSM's text special tokens (128000-128003, Llama 3's) against the *audio* vocabulary (2051 x 32
#: codebooks), so every load of csm-1b, the real checkpoint as much as the offline one, printed five
#: "must be `None` or an integer within the vocabulary" warnings; the ids are right.
KNOWN_NOISE = {
    "transformers.models.csm.configuration_csm": re.compile(
        r"Model config: \w+_token_id must be `None` or an integer within the vocabulary \(between 0 and \d+\), "
        r"got \d+\."
    ),
}


def drop_known_noise() -> None:
    """Attach a :class:`DropMessages` filter to each logger of :data:`KNOWN_NOISE` (once; no import of
    the library: a logger exists by name before its module loads)."""
    for name, pattern in KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(pattern))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        if hasattr(record, "access"):  # an access line's fields (csmserve.server.access)
            entry["access"] = record.access
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Configure the root logger (and uvicorn's) once, for the CLI."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RateLimit())
    handler.addFilter(ContextFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    drop_known_noise()
