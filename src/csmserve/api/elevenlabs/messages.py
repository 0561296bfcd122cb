"""ElevenLabs WebSocket messages, parsed in one place; server messages built in one place.

Client -> server (JSON text frames), as in ElevenLabs' multi-context reference::

    {"text": " ", "context_id": "c1", "voice_settings": {...}, "generation_config": {"chunk_length_schedule": [...]}}
    {"text": "Hello there. ", "context_id": "c1"}            # optional "flush", "try_trigger_generation"
    {"context_id": "c1", "flush": true}
    {"text": "", "context_id": "c1"}                        # keep-alive ({"text": ""} alone: the connection's)
    {"context_id": "c1", "close_context": true}
    {"close_socket": true}

The single-context ``stream-input`` has no ``context_id``; there ``{"text": ""}`` ends the input.
The first message may carry the key (``xi_api_key``, ``xi-api-key`` or ``authorization: Bearer``).

Server -> client: ``{"audio": "<base64>", "normalizedAlignment": {...}|null, "alignment": {...}|null,
"contextId": "c1"}`` and ``{"isFinal": true, "contextId": "c1"}``; errors as ElevenLabs sends
them, ``{"message": "...", "error": "<code>", "code": 1008}``.

Only :class:`InvalidRequest` is raised here. Never imports torch.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from csmserve.api.elevenlabs.formats import OutputFormat, parse_output_format
from csmserve.errors import InvalidRequest
from csmserve.server.payload import json_object
from csmserve.speech import SpeechRequest, Turn
from csmserve.speech.voices import VoiceChoice

DEFAULT_CONTEXT = "default"
#: A valid message, shown in errors about messages that are not one.
EXAMPLE = '{"text": "Hello ", "context_id": "c1"}'
MAX_CONTEXT_ID = 128
TEXT_NORMALIZATION = ("auto", "on", "off")
#: What the ElevenLabs reference says a client may send; other fields are refused as unknown.
KNOWN_FIELDS = {
    "text", "context_id", "voice_settings", "generation_config", "generator_config", "flush",
    "try_trigger_generation", "close_context", "close_socket", "xi_api_key", "xi-api-key",
    "authorization", "pronunciation_dictionary_locators",
}  # fmt: skip


@dataclass(frozen=True)
class StreamSettings:
    """The query parameters of a WebSocket (or HTTP) request. Those with no CSM meaning
    (``model_id``, ``language_code``, ``enable_logging``, ``enable_ssml_parsing``) are validated and
    otherwise ignored. ``normalize``: ``apply_text_normalization`` is not ``"off"``."""

    output: OutputFormat
    auto_mode: bool = False
    inactivity_timeout_s: float = 20.0
    sync_alignment: bool = False
    seed: int | None = None
    model_id: str | None = None
    normalize: bool = True


def _bool(params: Mapping[str, str], name: str, default: bool) -> bool:
    value = params.get(name)
    if value is None:
        return default
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0"):
        return False
    raise InvalidRequest(f"{name} must be true or false; got {value[:20]!r}")


def _int(value: Any, name: str, lo: int, hi: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise InvalidRequest(f"{name} must be an integer from {lo} to {hi}") from None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidRequest(f"{name} must be an integer from {lo} to {hi}")
    return value


def parse_seed(value: Any) -> int | None:
    """ElevenLabs' ``seed``: an integer from 0 to 4294967295, or null."""
    return _int(value, "seed", 0, 4_294_967_295)


def parse_text_normalization(value: Any) -> bool:
    """``apply_text_normalization``: whether numbers, dates and symbols are said as words. ``"auto"``
    (the default) and ``"on"`` turn it on, ``"off"`` off (docs/normalisation.md)."""
    if value is None:
        return True
    if value not in TEXT_NORMALIZATION:
        raise InvalidRequest(f"apply_text_normalization must be one of {', '.join(TEXT_NORMALIZATION)}")
    return value != "off"


def parse_query(params: Mapping[str, str]) -> StreamSettings:
    """Validate the query parameters ElevenLabs documents for its text-to-speech endpoints."""
    normalize = parse_text_normalization(params.get("apply_text_normalization"))
    for name in ("enable_logging", "enable_ssml_parsing"):
        _bool(params, name, False)
    return StreamSettings(
        output=parse_output_format(params.get("output_format")),
        auto_mode=_bool(params, "auto_mode", False),
        inactivity_timeout_s=float(_int(params.get("inactivity_timeout"), "inactivity_timeout", 1, 180) or 20),
        sync_alignment=_bool(params, "sync_alignment", False),
        seed=parse_seed(params.get("seed")),
        model_id=params.get("model_id"),
        normalize=normalize,
    )


# -- client messages ------------------------------------------------------------------------------
# ElevenLabs' messages carry no type tag (flags tell them apart), so parse_message, not a TypeAdapter,
# decides which one a frame is; each is still one pydantic type.
class TextInput(BaseModel):
    """Text for a context (``text`` may be " ", the context's opening, or "", a keep-alive)."""

    model_config = ConfigDict(frozen=True)

    context_id: str | None
    text: str
    flush: bool = False
    try_trigger: bool = False
    #: From the opening message: ``generation_config.chunk_length_schedule`` (None: not given).
    schedule: tuple[int, ...] | None = None


class CloseContext(BaseModel):
    model_config = ConfigDict(frozen=True)

    context_id: str


class CloseSocket(BaseModel):
    model_config = ConfigDict(frozen=True)


ClientMessage = TextInput | CloseContext | CloseSocket


def _flag(data: dict, name: str) -> bool:
    value = data.get(name, False)
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be true or false")
    return value


def _schedule(data: dict) -> tuple[int, ...] | None:
    config = data.get("generation_config", data.get("generator_config"))
    if config is None:
        return None
    if not isinstance(config, dict):
        raise InvalidRequest("generation_config must be an object such as {\"chunk_length_schedule\": [120, 160]}")
    schedule = config.get("chunk_length_schedule")
    if schedule is None:
        return None
    if (
        not isinstance(schedule, list)
        or not 0 < len(schedule) <= 16
        or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and 50 <= x <= 500
            for x in schedule
        )
    ):
        raise InvalidRequest("chunk_length_schedule must be a list of 1 to 16 numbers, each from 50 to 500")
    return tuple(int(x) for x in schedule)


def _context_id(data: dict) -> str | None:
    value = data.get("context_id")
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_CONTEXT_ID:
        raise InvalidRequest(f"context_id must be a string of 1 to {MAX_CONTEXT_ID} characters")
    return value


def parse_message(raw: str | bytes | None, max_text_chars: int) -> ClientMessage:
    """One client frame as a typed message, or :class:`InvalidRequest` saying what is wrong."""
    if not isinstance(raw, str):
        raise InvalidRequest('expected a JSON text frame such as {"text": "Hello ", "context_id": "c1"}, got binary data')
    data = json_object(raw, EXAMPLE)
    unknown = sorted(set(data) - KNOWN_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0][:40]!r}; see ElevenLabs' WebSocket reference for the fields")
    if "voice_settings" in data and not isinstance(data["voice_settings"], (dict, type(None))):
        raise InvalidRequest("voice_settings must be an object")
    context_id = _context_id(data)
    if _flag(data, "close_socket"):
        return CloseSocket()
    if _flag(data, "close_context"):
        if context_id is None:
            raise InvalidRequest("close_context needs the context_id to close")
        return CloseContext(context_id=context_id)
    flush = _flag(data, "flush")
    if "text" not in data and not flush:
        raise InvalidRequest("a message needs text (\" \" opens a context, \"\" keeps it alive), flush, close_context or close_socket")
    text = data.get("text", "")
    if not isinstance(text, str):
        raise InvalidRequest("text must be a string")
    if len(text) > max_text_chars:
        raise InvalidRequest(f"text is {len(text)} characters; the limit is {max_text_chars}")
    return TextInput(
        context_id=context_id, text=text, flush=flush, try_trigger=_flag(data, "try_trigger_generation"),
        schedule=_schedule(data),
    )


def key_of(raw: str | bytes | None) -> str | None:
    """The API key a first message carries (``xi_api_key``, ``xi-api-key``, ``authorization``), if any."""
    try:
        data = json_object(raw, EXAMPLE)
    except InvalidRequest:
        return None
    for name in ("xi_api_key", "xi-api-key"):
        if isinstance(data.get(name), str):
            return data[name]
    auth = data.get("authorization")
    return key_of_authorization(auth) if isinstance(auth, str) else None


def key_of_authorization(value: str) -> str:
    """The key in an ``authorization`` value: "Bearer <key>", or the key alone."""
    return value[7:].strip() if value[:7].lower() == "bearer " else value


# -- to speech ------------------------------------------------------------------------------------
def speech_request(
    voice: VoiceChoice, text: str, *, seed: int | None, request_id: str | None, context: tuple[Turn, ...] = (),
    tenant: str | None = None,
) -> SpeechRequest:
    """One sentence of a context (or of an HTTP request's text) in the ``voice_id``'s voice, for ``tenant``."""
    return SpeechRequest(
        text=text, speaker_id=voice.speaker_id, voice=voice.voice, seed=seed, request_id=request_id, context=context,
        tenant=tenant,
    )


# -- server messages ------------------------------------------------------------------------------
def audio_message(
    audio: bytes, context_id: str | None, alignment: dict | None = None, normalized: dict | None = None
) -> dict:
    """An audio chunk with the characters it speaks: ``alignment`` of the text as sent,
    ``normalized`` (``normalizedAlignment``) of the spoken text; None when it speaks none."""
    message: dict[str, Any] = {
        "audio": base64.b64encode(audio).decode("ascii"),
        "normalizedAlignment": normalized,
        "alignment": alignment,
    }
    if context_id is not None:
        message["contextId"] = context_id
    return message


def final_message(context_id: str | None) -> dict:
    """The last message of a context (multi-context) or of the stream (single context)."""
    if context_id is None:
        return {"audio": None, "isFinal": True, "normalizedAlignment": None, "alignment": None}
    return {"isFinal": True, "contextId": context_id}


def error_message(error: str, message: str, code: int = 1008, context_id: str | None = None) -> dict:
    """An error as ElevenLabs' WebSockets send it: ``{"message", "error", "code"}`` (+ ``contextId``)."""
    event: dict[str, Any] = {"message": message, "error": error, "code": code}
    if context_id is not None:
        event["contextId"] = context_id
    return event

