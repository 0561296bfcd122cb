"""JSON in, as every route reads it: one JSON object per frame or body, or an error a client can act on."""

from __future__ import annotations

import json

from csmserve.errors import InvalidRequest


def json_object(raw: str | bytes | None, example: str) -> dict:
    """Decode one text frame (or a request body, decoded) into a JSON object, or raise
    :class:`InvalidRequest`; ``example`` is a valid message of the route's API, shown in the error."""
    if raw is None or isinstance(raw, (bytes, bytearray)):
        raise InvalidRequest(f"expected a JSON text frame such as {example}, got binary data")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # ValueError: bad JSON, or an int of over 4300 digits
        raise InvalidRequest(f"message is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"message must be a JSON object such as {example}")
    try:  # "\ud800" escapes decode to lone surrogates, which no tokenizer or UTF-8 writer accepts
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest("message contains invalid Unicode (a lone surrogate escape such as \\ud800)") from None
    return data
