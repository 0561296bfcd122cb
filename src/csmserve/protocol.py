"""The WebSocket protocol of ``/ws/generate``: every message defined once, parsed in one place.

Client -> server (text frames, JSON):

* ``{"text": "Hello", "speaker_id": 0}``: a generation request (``"type": "generate"`` is implied),
  with optional ``chunk_ms``, ``first_chunk_ms``, ``max_audio_ms``, ``temperature``, ``top_k``,
  ``seed`` and ``request_id``.
* ``{"type": "cancel", "request_id": "..."}``: stop a request (the current one when no id is given).

Server -> client: binary frames of mono 16-bit little-endian PCM, then one text frame
``{"done": true, ...}``. A request that fails ends with ``{"done": true, "error": {...}}``, which
seed-style clients (that only look for ``done``) also recognise as the end of the request.

Nothing here raises anything but :class:`~csmserve.errors.InvalidRequest`: a bad message becomes
an error event and the connection stays usable. Never imports torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from csmserve.errors import InvalidRequest

REQUEST_FIELDS = (
    "type",
    "text",
    "speaker_id",
    "chunk_ms",
    "first_chunk_ms",
    "max_audio_ms",
    "temperature",
    "top_k",
    "seed",
    "request_id",
)


@dataclass(frozen=True)
class Limits:
    """Server-side bounds that validation needs (from :class:`~csmserve.config.Settings`)."""

    max_text_chars: int = 1000
    min_speaker_id: int = 0
    max_speaker_id: int = 9
    max_audio_ms: int = 90_000
    default_chunk_ms: int = 200


class GenerateRequest(BaseModel):
    """One utterance to synthesise. Validated by :func:`parse_generate`; build it only from there."""

    model_config = ConfigDict(frozen=True)

    type: Literal["generate"] = "generate"
    text: str
    speaker_id: int = 0
    chunk_ms: int = 200
    first_chunk_ms: int | None = None
    max_audio_ms: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    seed: int | None = None
    request_id: str | None = None
    #: Unknown fields the client sent; they are ignored and reported back in ``done``.
    ignored_fields: tuple[str, ...] = Field(default=())


class CancelMessage(BaseModel):
    model_config = ConfigDict(frozen=True)

    type: Literal["cancel"] = "cancel"
    request_id: str | None = None


ClientMessage = GenerateRequest | CancelMessage


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_field(data: dict, name: str, lo: int, hi: int, unit: str = "") -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if not _is_int(value) or not lo <= value <= hi:
        raise InvalidRequest(f"{name} must be an integer from {lo} to {hi}{unit}")
    return value


def parse_json_object(raw: str | bytes | None) -> dict:
    """Decode one text frame into a JSON object, or raise :class:`InvalidRequest`."""
    if raw is None or isinstance(raw, (bytes, bytearray)):
        raise InvalidRequest("expected a JSON text frame such as {\"text\": \"Hello\", \"speaker_id\": 0}, got binary data")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InvalidRequest(f"message is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("message must be a JSON object such as {\"text\": \"Hello\", \"speaker_id\": 0}")
    return data


def parse_generate(data: dict, limits: Limits) -> GenerateRequest:
    """Validate a generation request with messages a client developer can act on."""
    text = data.get("text")
    if "text" not in data:
        raise InvalidRequest("text is required")
    if not isinstance(text, str):
        raise InvalidRequest("text must be a string")
    if not text.strip():
        raise InvalidRequest("text must not be empty")
    if len(text) > limits.max_text_chars:
        raise InvalidRequest(
            f"text is {len(text)} characters; the limit is {limits.max_text_chars}"
        )
    speaker_id = data.get("speaker_id", 0)
    if not _is_int(speaker_id) or not limits.min_speaker_id <= speaker_id <= limits.max_speaker_id:
        raise InvalidRequest(
            f"speaker_id must be an integer from {limits.min_speaker_id} to {limits.max_speaker_id}"
        )
    chunk_ms = _int_field(data, "chunk_ms", 20, 1000, " (milliseconds)")
    first_chunk_ms = _int_field(data, "first_chunk_ms", 20, 1000, " (milliseconds)")
    max_audio_ms = _int_field(data, "max_audio_ms", 80, limits.max_audio_ms, " (milliseconds)")
    top_k = _int_field(data, "top_k", 1, 2048)
    seed = _int_field(data, "seed", 0, 2**63 - 1)
    temperature = data.get("temperature")
    if temperature is not None:
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not math.isfinite(temperature)
            or not 0 < temperature <= 5
        ):
            raise InvalidRequest("temperature must be a number greater than 0 and at most 5")
        temperature = float(temperature)
    request_id = data.get("request_id")
    if request_id is not None:
        if _is_int(request_id):
            request_id = str(request_id)
        if not isinstance(request_id, str) or not 0 < len(request_id) <= 128:
            raise InvalidRequest("request_id must be a string of 1 to 128 characters")
    ignored = tuple(sorted(k for k in data if k not in REQUEST_FIELDS and k != "token"))
    try:
        return GenerateRequest(
            text=text,
            speaker_id=speaker_id,
            chunk_ms=chunk_ms if chunk_ms is not None else limits.default_chunk_ms,
            first_chunk_ms=first_chunk_ms,
            max_audio_ms=max_audio_ms,
            temperature=temperature,
            top_k=top_k,
            seed=seed,
            request_id=request_id,
            ignored_fields=ignored,
        )
    except ValidationError as exc:  # pragma: no cover - the checks above are stricter
        raise InvalidRequest(str(exc)) from None


def parse_client_message(raw: str | bytes | None, limits: Limits) -> ClientMessage:
    """Parse one WebSocket frame into a typed message, or raise :class:`InvalidRequest`."""
    data = parse_json_object(raw)
    kind = data.get("type", "generate")
    if kind == "generate":
        return parse_generate(data, limits)
    if kind == "cancel":
        request_id = data.get("request_id")
        if _is_int(request_id):
            request_id = str(request_id)
        if request_id is not None and not isinstance(request_id, str):
            raise InvalidRequest("request_id must be a string")
        return CancelMessage(request_id=request_id)
    raise InvalidRequest(f"unknown message type {kind!r}; expected 'generate' or 'cancel'")


def request_id_of(raw: str | bytes | None) -> str | None:
    """Best-effort request id of a message that failed validation, to echo it in the error."""
    try:
        data = json.loads(raw) if isinstance(raw, str) else None
    except (json.JSONDecodeError, RecursionError):
        return None
    if isinstance(data, dict):
        rid = data.get("request_id")
        if isinstance(rid, str) and len(rid) <= 128:
            return rid
        if _is_int(rid):
            return str(rid)
    return None


def error_event(code: str, message: str, request_id: str | None = None, **extra: Any) -> dict:
    """The frame that ends a failed request: ``{"done": true, "error": {...}}``."""
    event: dict[str, Any] = {"done": True, "error": {"code": code, "message": message}}
    if request_id is not None:
        event["request_id"] = request_id
    event.update(extra)
    return event


def done_event(request_id: str | None, **stats: Any) -> dict:
    """The frame that ends a successful (or cancelled) request."""
    event: dict[str, Any] = {"done": True}
    if request_id is not None:
        event["request_id"] = request_id
    event.update(stats)
    return event
