"""The WebSocket protocol of ``/ws/generate``: every message defined once, parsed in one place.

Client -> server (text frames, JSON):

* ``{"text": "Hello", "speaker_id": 0}``: a generation request (``"type": "generate"`` is implied),
  with optional fields (see :class:`GenerateRequest`): chunking, length, sampling, ``request_id``,
  output ``format``/``sample_rate``, telephony ``framing``, a stored ``voice`` and ``context`` turns.
* ``{"type": "text", "context_id": "c1", "text": "Sure, let me"}`` ... ``{"type": "flush", ...}`` /
  ``{"type": "end", "context_id": "c1"}``: text streamed in from an LLM; speech starts at the first
  sentence boundary (or flush) and continues as one audio stream until ``end``.
* ``{"type": "cancel", "request_id": "..."}`` (or ``"context_id"``, or neither: the current one).

Server -> client: binary frames of audio (mono 16-bit little-endian PCM by default), then one text
frame ``{"done": true, ...}``. A request that fails ends with ``{"done": true, "error": {...}}``, which
seed-style clients (that only look for ``done``) also recognise as the end of the request. With
``framing`` set, audio goes out as the telephony provider's JSON media messages instead.

Nothing here raises anything but :class:`~csmserve.errors.InvalidRequest`: a bad message becomes
an error event and the connection stays usable. A request becomes speech through
:meth:`GenerateRequest.to_speech_request` (what to say) and :meth:`GenerateRequest.output_sink` (how
the audio leaves). Never imports torch.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from csmserve.audio.formats import make_encoder
from csmserve.audio.telephony import TelnyxFramer, TwilioFramer
from csmserve.config import Settings
from csmserve.errors import InvalidRequest
from csmserve.server.payload import json_object
from csmserve.speech import AudioSink, SpeechRequest, StreamStats, Turn as SpeechTurn
from csmserve.speech.sink import AsCallMessages, InChunks, Packer

PCM_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
FORMATS = ("pcm_s16le", "mulaw", "alaw")
FRAMINGS = ("twilio", "telnyx")
MAX_CONTEXT_TURNS = 32
MIN_TEMPERATURE = 0.01

OPTION_FIELDS = (
    "speaker_id",
    "chunk_ms",
    "first_chunk_ms",
    "max_audio_ms",
    "temperature",
    "top_k",
    "seed",
    "request_id",
    "format",
    "sample_rate",
    "framing",
    "stream_sid",
    "voice",
    "context",
)
KNOWN_FIELDS = {"type", "text", "context_id", "token", *OPTION_FIELDS}
#: A valid message, shown in errors about messages that are not one.
EXAMPLE = '{"text": "Hello", "speaker_id": 0}'


@dataclass(frozen=True)
class Limits:
    """Server-side bounds that validation needs (from :class:`~csmserve.config.Settings`)."""

    max_text_chars: int = 4096
    min_speaker_id: int = 0
    max_speaker_id: int = 9
    max_audio_ms: int = 90_000
    default_chunk_ms: int = 200
    max_context_audio_s: float = 60.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            max_text_chars=settings.max_text_chars,
            min_speaker_id=settings.min_speaker_id,
            max_speaker_id=settings.max_speaker_id,
            max_audio_ms=settings.max_audio_ms,
            default_chunk_ms=settings.default_chunk_ms,
        )


class Turn(BaseModel):
    """A context turn: an earlier utterance, with its audio as base64 mono s16le at 24 kHz (optional)."""

    model_config = ConfigDict(frozen=True)

    speaker_id: int
    text: str
    audio: bytes | None = None  # raw s16le bytes, already base64-decoded


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
    format: Literal["pcm_s16le", "mulaw", "alaw"] = "pcm_s16le"
    sample_rate: int = 24_000
    framing: Literal["twilio", "telnyx"] | None = None
    stream_sid: str | None = None
    voice: str | None = None
    context: tuple[Turn, ...] = ()
    #: Unknown fields the client sent; they are ignored and reported back in ``done``.
    ignored_fields: tuple[str, ...] = Field(default=())

    def to_speech_request(self) -> SpeechRequest:
        """What to say. ``speaker_id`` only when the client sent it: a named voice brings its own."""
        return SpeechRequest(
            text=self.text,
            speaker_id=self.speaker_id if "speaker_id" in self.model_fields_set else None,
            voice=self.voice,
            max_audio_ms=self.max_audio_ms,
            temperature=self.temperature,
            top_k=self.top_k,
            seed=self.seed,
            request_id=self.request_id,
            context=tuple(SpeechTurn(t.speaker_id, t.text, t.audio) for t in self.context),
        )

    def output_sink(self, stats: StreamStats) -> AudioSink:
        """How the audio leaves: binary chunks of exactly ``chunk_ms`` of the encoded audio (the first
        ``first_chunk_ms``, the last what is left), or with ``framing`` the provider's JSON media
        messages of whole 20 ms frames, then a mark."""
        packer: Packer
        if self.framing == "twilio":
            packer = AsCallMessages(TwilioFramer(self.stream_sid), self.mark_name)
        elif self.framing == "telnyx":
            packer = AsCallMessages(TelnyxFramer(), self.mark_name)
        else:
            width = 2 if self.format == "pcm_s16le" else 1
            size = width * self.sample_rate * self.chunk_ms // 1000
            first = width * self.sample_rate * self.first_chunk_ms // 1000 if self.first_chunk_ms else None
            # Keep whole samples in every chunk.
            packer = InChunks(size - size % width, first - first % width if first else None)
        return AudioSink(make_encoder(self.format, self.sample_rate), stats, packer)

    @property
    def mark_name(self) -> str:
        """The mark that ends a framed stream (the provider echoes it once the audio has played)."""
        return self.request_id or "csmserve-end"


class TextMessage(BaseModel):
    """A fragment of streamed text for ``context_id``; the first one's options apply to the stream."""

    model_config = ConfigDict(frozen=True)

    type: Literal["text"] = "text"
    context_id: str
    text: str
    options: GenerateRequest


class FlushMessage(BaseModel):
    model_config = ConfigDict(frozen=True)

    type: Literal["flush", "end"] = "flush"
    context_id: str


class CancelMessage(BaseModel):
    model_config = ConfigDict(frozen=True)

    type: Literal["cancel"] = "cancel"
    request_id: str | None = None
    context_id: str | None = None


ClientMessage = GenerateRequest | TextMessage | FlushMessage | CancelMessage


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_field(data: dict, name: str, lo: int, hi: int, unit: str = "") -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if not _is_int(value) or not lo <= value <= hi:
        raise InvalidRequest(f"{name} must be an integer from {lo} to {hi}{unit}")
    return value


def _id_field(data: dict, name: str) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if _is_int(value):
        value = str(value)
    if not isinstance(value, str) or not 0 < len(value) <= 128:
        raise InvalidRequest(f"{name} must be a string of 1 to 128 characters")
    return value


def parse_json_object(raw: str | bytes | None) -> dict:
    """Decode one text frame into a JSON object, or raise :class:`InvalidRequest`."""
    return json_object(raw, EXAMPLE)


def _text(data: dict, limits: Limits, *, allow_empty: bool = False) -> str:
    if "text" not in data:
        raise InvalidRequest("text is required")
    text = data["text"]
    if not isinstance(text, str):
        raise InvalidRequest("text must be a string")
    if not allow_empty and not text.strip():
        raise InvalidRequest("text must not be empty")
    if len(text) > limits.max_text_chars:
        raise InvalidRequest(f"text is {len(text)} characters; the limit is {limits.max_text_chars}")
    return text


def _speaker(value: Any, limits: Limits, name: str = "speaker_id") -> int:
    if not _is_int(value) or not limits.min_speaker_id <= value <= limits.max_speaker_id:
        raise InvalidRequest(f"{name} must be an integer from {limits.min_speaker_id} to {limits.max_speaker_id}")
    return value


def _context(value: Any, limits: Limits) -> tuple[Turn, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_CONTEXT_TURNS:
        raise InvalidRequest(f"context must be a list of at most {MAX_CONTEXT_TURNS} turns")
    turns = []
    budget = int(limits.max_context_audio_s * 24_000 * 2)
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise InvalidRequest(f"context[{i}] must be an object with speaker_id, text and optional audio")
        speaker = _speaker(item.get("speaker_id"), limits, f"context[{i}].speaker_id")
        text = item.get("text")
        if not isinstance(text, str) or not text.strip() or len(text) > limits.max_text_chars:
            raise InvalidRequest(f"context[{i}].text must be a non-empty string of at most {limits.max_text_chars} characters")
        audio = item.get("audio")
        raw = None
        if audio is not None:
            if not isinstance(audio, str):
                raise InvalidRequest(f"context[{i}].audio must be base64 of mono 16-bit PCM at 24 kHz")
            try:
                raw = base64.b64decode(audio, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidRequest(f"context[{i}].audio is not valid base64") from None
            if len(raw) % 2:
                raise InvalidRequest(f"context[{i}].audio must hold whole 16-bit samples")
            budget -= len(raw)
            if budget < 0:
                raise InvalidRequest(f"context audio is limited to {limits.max_context_audio_s:.0f} s in total")
        turns.append(Turn(speaker_id=speaker, text=text, audio=raw))
    return tuple(turns)


def parse_options(data: dict, limits: Limits, text: str) -> GenerateRequest:
    """Validate every generation option with messages a client developer can act on."""
    speaker_id = _speaker(data.get("speaker_id", 0), limits)
    chunk_ms = _int_field(data, "chunk_ms", 20, 1000, " (milliseconds)")
    first_chunk_ms = _int_field(data, "first_chunk_ms", 20, 1000, " (milliseconds)")
    max_audio_ms = _int_field(data, "max_audio_ms", 80, limits.max_audio_ms, " (milliseconds)")
    top_k = _int_field(data, "top_k", 1, 2048)
    seed = _int_field(data, "seed", 0, 2**63 - 1)
    temperature = data.get("temperature")
    if temperature is not None:
        # Compare before converting: an integer too large for a float must not raise OverflowError.
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not MIN_TEMPERATURE <= temperature <= 5
            or not math.isfinite(temperature)
        ):
            # Far below MIN_TEMPERATURE, logits / temperature overflow float32 and sampling fails.
            raise InvalidRequest(f"temperature must be a number from {MIN_TEMPERATURE} to 5")
        temperature = float(temperature)
    framing = data.get("framing")
    if framing is not None and framing not in FRAMINGS:
        raise InvalidRequest(f"framing must be one of {', '.join(FRAMINGS)}")
    fmt = data.get("format", "mulaw" if framing else "pcm_s16le")
    if fmt not in FORMATS:
        raise InvalidRequest(f"format must be one of {', '.join(FORMATS)}")
    rate = data.get("sample_rate", 24_000 if fmt == "pcm_s16le" else 8000)
    if not _is_int(rate) or rate not in PCM_RATES:
        raise InvalidRequest(f"sample_rate must be one of {', '.join(map(str, PCM_RATES))}")
    if fmt in ("mulaw", "alaw") and rate != 8000:
        raise InvalidRequest(f"{fmt} is only available at 8000 Hz")
    stream_sid = _id_field(data, "stream_sid")
    if framing is not None and (fmt, rate) != ("mulaw", 8000):
        raise InvalidRequest(f"{framing} framing carries mulaw at 8000 Hz; drop format/sample_rate or set them so")
    if framing == "twilio" and stream_sid is None:
        raise InvalidRequest("twilio framing needs stream_sid (the streamSid of the call's media stream)")
    voice = _id_field(data, "voice")
    ignored = tuple(sorted(k for k in data if k not in KNOWN_FIELDS))
    # speaker_id only when the client sent it: a named voice otherwise brings its own.
    explicit = {"speaker_id": speaker_id} if "speaker_id" in data else {}
    return GenerateRequest(
        text=text,
        **explicit,
        chunk_ms=chunk_ms if chunk_ms is not None else limits.default_chunk_ms,
        first_chunk_ms=first_chunk_ms,
        max_audio_ms=max_audio_ms,
        temperature=temperature,
        top_k=top_k,
        seed=seed,
        request_id=_id_field(data, "request_id"),
        format=fmt,
        sample_rate=rate,
        framing=framing,
        stream_sid=stream_sid,
        voice=voice,
        context=_context(data.get("context"), limits),
        ignored_fields=ignored,
    )


def parse_generate(data: dict, limits: Limits) -> GenerateRequest:
    """A complete generation request (``text`` required)."""
    return parse_options(data, limits, _text(data, limits))


def parse_client_message(raw: str | bytes | None, limits: Limits) -> ClientMessage:
    """Parse one WebSocket frame into a typed message, or raise :class:`InvalidRequest`."""
    data = parse_json_object(raw)
    kind = data.get("type", "generate")
    if kind == "generate":
        return parse_generate(data, limits)
    if kind == "text":
        context_id = _id_field(data, "context_id") or "default"
        text = _text(data, limits, allow_empty=True)
        return TextMessage(context_id=context_id, text=text, options=parse_options(data, limits, ""))
    if kind in ("flush", "end"):
        return FlushMessage(type=kind, context_id=_id_field(data, "context_id") or "default")
    if kind == "cancel":
        return CancelMessage(request_id=_id_field(data, "request_id"), context_id=_id_field(data, "context_id"))
    raise InvalidRequest(f"unknown message type {kind!r}; expected generate, text, flush, end or cancel")


def request_id_of(raw: str | bytes | None) -> str | None:
    """Best-effort request id of a message that failed validation, to echo it in the error."""
    try:
        data = json.loads(raw) if isinstance(raw, str) else None
    except (ValueError, RecursionError):
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
