"""Wyoming's framing, read with bounds: a JSON header line, then ``data_length`` bytes of JSON data and
``payload_length`` bytes of payload.

The ``wyoming`` package's reader trusts both lengths (a client could announce gigabytes); this one
refuses an event larger than ``max_bytes`` before reading it. The header line is bounded by the
stream reader's ``limit`` (``asyncio.start_server(limit=...)``). Events are written with the package's
own writer (``wyoming.event.async_write_event``).
"""

from __future__ import annotations

import asyncio
import json

from wyoming.event import Event

from csmserve.errors import InvalidRequest, MessageTooLarge


def _length(header: dict, name: str, max_bytes: int) -> int:
    value = header.get(name)
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidRequest(f"{name} must be a non-negative integer")
    if value > max_bytes:
        raise MessageTooLarge(f"events are limited to {max_bytes} bytes of data and of payload")
    return value


def _json_object(raw: bytes, what: str) -> dict:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidRequest(f"the event's {what} is not JSON") from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"the event's {what} must be a JSON object")
    return value


async def read_event(reader: asyncio.StreamReader, max_bytes: int) -> Event | None:
    """The next event, or None when the client has gone (end of stream, even mid-event). Raises
    :class:`MessageTooLarge` for a header line past the reader's limit or a length past ``max_bytes``,
    :class:`InvalidRequest` for an event that is not Wyoming's framing. Safe to cancel (the stream is
    then out of step: close it)."""
    try:
        line = await reader.readline()
    except ValueError:  # asyncio's LimitOverrunError, as readline reports it
        raise MessageTooLarge(f"an event's header line is limited to {max_bytes} bytes") from None
    if not line.endswith(b"\n"):
        return None
    header = _json_object(line, "header")
    kind = header.get("type")
    if not isinstance(kind, str) or not kind:
        raise InvalidRequest("an event needs a type")
    data = header.get("data") or {}
    if not isinstance(data, dict):
        raise InvalidRequest("the event's data must be a JSON object")
    data_length = _length(header, "data_length", max_bytes)
    payload_length = _length(header, "payload_length", max_bytes)
    try:
        if data_length:
            data = {**data, **_json_object(await reader.readexactly(data_length), "data")}
        payload = await reader.readexactly(payload_length) if payload_length else None
    except asyncio.IncompleteReadError:
        return None
    return Event(type=kind, data=data, payload=payload)
