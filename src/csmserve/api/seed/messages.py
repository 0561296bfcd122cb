"""The WebSocket protocol of ``/ws/generate``: every message a pydantic type, parsed through one
adapter (:data:`CLIENT_MESSAGES`, by the ``type`` tag).

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

Nothing here raises anything but :class:`~csmserve.errors.InvalidRequest` (each field's validator
raises it, with a message a client developer can act on): a bad message becomes an error event and
the connection stays usable. A request becomes speech through
:meth:`GenerateRequest.to_speech_request` (what to say) and :meth:`GenerateRequest.output_sink` (how
the audio leaves). Never imports torch.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from csmserve.audio.formats import make_encoder
from csmserve.audio.telephony import TelnyxFramer, TwilioFramer
from csmserve.config import Settings
from csmserve.errors import InvalidRequest
from csmserve.server.payload import json_object
from csmserve.speech import AudioSink, SpeechRequest, StreamStats, Turn as SpeechTurn
from csmserve.speech.sink import AsCallMessages, InChunks, Packer
from csmserve.speech.spoken import spoken_text

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
    "normalize",
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


#: The default of a field that must be given (told apart from an explicit null).
_MISSING: Any = object()


def _limits(info: ValidationInfo) -> Limits:
    """The server's limits passed as validation context (the defaults when there are none)."""
    return (info.context or {}).get("limits") or Limits()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_value(value: Any, name: str, lo: int, hi: int, unit: str = "") -> int | None:
    if value is None:
        return None
    if not _is_int(value) or not lo <= value <= hi:
        raise InvalidRequest(f"{name} must be an integer from {lo} to {hi}{unit}")
    return value


def _id_value(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if _is_int(value):
        value = str(value)
    if not isinstance(value, str) or not 0 < len(value) <= 128:
        raise InvalidRequest(f"{name} must be a string of 1 to 128 characters")
    return value


def _text_value(value: Any, limits: Limits, *, allow_empty: bool = False) -> str:
    if value is _MISSING:
        raise InvalidRequest("text is required")
    if not isinstance(value, str):
        raise InvalidRequest("text must be a string")
    if not allow_empty and not value.strip():
        raise InvalidRequest("text must not be empty")
    if len(value) > limits.max_text_chars:
        raise InvalidRequest(f"text is {len(value)} characters; the limit is {limits.max_text_chars}")
    return value


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


class GenerateRequest(BaseModel):
    """One utterance to synthesise, with how its audio leaves.

    Validated field by field in the order declared (the first wrong one is reported, with a message
    a client developer can act on), against the server's :class:`Limits` given as validation context
    (:data:`CLIENT_MESSAGES`, :func:`parse_generate`). ``speaker_id`` counts only when the client sent
    it (``model_fields_set``): a named voice otherwise brings its own.
    """

    model_config = ConfigDict(frozen=True)

    type: Literal["generate"] = "generate"
    text: str = Field(default=_MISSING, validate_default=True)
    speaker_id: int = 0
    chunk_ms: int = Field(default=None, validate_default=True)  # None: the server's default_chunk_ms
    first_chunk_ms: int | None = None
    max_audio_ms: int | None = None
    top_k: int | None = None
    seed: int | None = None
    temperature: float | None = None
    framing: Literal["twilio", "telnyx"] | None = None
    format: Literal["pcm_s16le", "mulaw", "alaw"] = "pcm_s16le"  # mulaw with framing
    sample_rate: int = 24_000  # 8000 for G.711
    stream_sid: str | None = Field(default=None, validate_default=True)  # checked with framing, given or not
    voice: str | None = None
    request_id: str | None = None
    context: tuple[Turn, ...] = ()
    #: Numbers, dates, prices and symbols said as words (docs/normalisation.md); false: as written.
    normalize: bool = True
    #: Unknown fields the client sent; they are ignored and reported back in ``done``.
    ignored_fields: tuple[str, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        """Fields the client did not send that depend on others (format on framing, rate on format)."""
        if not isinstance(data, dict):
            return data
        data = {**data, "ignored_fields": tuple(sorted(k for k in data if k not in KNOWN_FIELDS))}
        fmt = data.setdefault("format", "mulaw" if data.get("framing") else "pcm_s16le")
        data.setdefault("sample_rate", 24_000 if fmt == "pcm_s16le" else 8000)
        return data

    @field_validator("text", mode="before")
    @classmethod
    def _text(cls, value: Any, info: ValidationInfo) -> str:
        # A text stream's options (TextMessage) carry no text of their own.
        return _text_value(value, _limits(info), allow_empty=(info.context or {}).get("stream_options", False))

    @field_validator("speaker_id", mode="before")
    @classmethod
    def _speaker_id(cls, value: Any, info: ValidationInfo) -> int:
        return _speaker(value, _limits(info))

    @field_validator("chunk_ms", "first_chunk_ms", mode="before")
    @classmethod
    def _chunk(cls, value: Any, info: ValidationInfo) -> int | None:
        chunk = _int_value(value, info.field_name, 20, 1000, " (milliseconds)")
        if chunk is None and info.field_name == "chunk_ms":
            return _limits(info).default_chunk_ms
        return chunk

    @field_validator("max_audio_ms", mode="before")
    @classmethod
    def _max_audio_ms(cls, value: Any, info: ValidationInfo) -> int | None:
        return _int_value(value, "max_audio_ms", 80, _limits(info).max_audio_ms, " (milliseconds)")

    @field_validator("top_k", mode="before")
    @classmethod
    def _top_k(cls, value: Any) -> int | None:
        return _int_value(value, "top_k", 1, 2048)

    @field_validator("seed", mode="before")
    @classmethod
    def _seed(cls, value: Any) -> int | None:
        return _int_value(value, "seed", 0, 2**63 - 1)

    @field_validator("temperature", mode="before")
    @classmethod
    def _temperature(cls, value: Any) -> float | None:
        if value is None:
            return None
        # Compare before converting: an integer too large for a float must not raise OverflowError.
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not MIN_TEMPERATURE <= value <= 5
            or not math.isfinite(value)
        ):
            # Far below MIN_TEMPERATURE, logits / temperature overflow float32 and sampling fails.
            raise InvalidRequest(f"temperature must be a number from {MIN_TEMPERATURE} to 5")
        return float(value)

    @field_validator("framing", mode="before")
    @classmethod
    def _framing(cls, value: Any) -> str | None:
        if value is not None and value not in FRAMINGS:
            raise InvalidRequest(f"framing must be one of {', '.join(FRAMINGS)}")
        return value

    @field_validator("format", mode="before")
    @classmethod
    def _format(cls, value: Any) -> str:
        if value not in FORMATS:
            raise InvalidRequest(f"format must be one of {', '.join(FORMATS)}")
        return value

    @field_validator("sample_rate", mode="before")
    @classmethod
    def _sample_rate(cls, value: Any, info: ValidationInfo) -> int:
        if not _is_int(value) or value not in PCM_RATES:
            raise InvalidRequest(f"sample_rate must be one of {', '.join(map(str, PCM_RATES))}")
        fmt = info.data["format"]
        if fmt in ("mulaw", "alaw") and value != 8000:
            raise InvalidRequest(f"{fmt} is only available at 8000 Hz")
        return value

    @field_validator("stream_sid", mode="before")
    @classmethod
    def _stream_sid(cls, value: Any, info: ValidationInfo) -> str | None:
        stream_sid = _id_value(value, "stream_sid")
        framing = info.data["framing"]
        if framing is not None and (info.data["format"], info.data["sample_rate"]) != ("mulaw", 8000):
            raise InvalidRequest(f"{framing} framing carries mulaw at 8000 Hz; drop format/sample_rate or set them so")
        if framing == "twilio" and stream_sid is None:
            raise InvalidRequest("twilio framing needs stream_sid (the streamSid of the call's media stream)")
        return stream_sid

    @field_validator("voice", "request_id", mode="before")
    @classmethod
    def _id(cls, value: Any, info: ValidationInfo) -> str | None:
        return _id_value(value, info.field_name)

    @field_validator("context", mode="before")
    @classmethod
    def _context(cls, value: Any, info: ValidationInfo) -> tuple[Turn, ...]:
        return _context(value, _limits(info))

    @field_validator("normalize", mode="before")
    @classmethod
    def _normalize(cls, value: Any) -> bool:
        if not isinstance(value, bool):
            raise InvalidRequest("normalize must be true or false")
        return value

    def to_speech_request(self, tenant: str | None = None) -> SpeechRequest:
        """What to say (the text's spoken form, unless ``normalize`` is off), for ``tenant``.
        ``speaker_id`` only when the client sent it: a named voice brings its own."""
        return SpeechRequest(
            text=spoken_text(self.text, self.normalize),
            speaker_id=self.speaker_id if "speaker_id" in self.model_fields_set else None,
            voice=self.voice,
            max_audio_ms=self.max_audio_ms,
            temperature=self.temperature,
            top_k=self.top_k,
            seed=self.seed,
            request_id=self.request_id,
            context=tuple(SpeechTurn(t.speaker_id, t.text, t.audio) for t in self.context),
            tenant=tenant,
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

    def done_figures(self, stats: StreamStats) -> dict:
        """The figures of the ``done`` frame: ``samples`` counts what the client received, at the output
        ``sample_rate`` (a G.711 byte is a sample), not the engine's 24 kHz samples."""
        width = 2 if self.format == "pcm_s16le" else 1
        return {
            **stats.as_event_fields(), "samples": stats.encoded_bytes // width, "sample_rate": self.sample_rate,
            "format": self.format,
        }

    @property
    def mark_name(self) -> str:
        """The mark that ends a framed stream (the provider echoes it once the audio has played)."""
        return self.request_id or "csmserve-end"


class TextMessage(BaseModel):
    """A fragment of streamed text for ``context_id``; the first one's options apply to the stream."""

    model_config = ConfigDict(frozen=True)

    type: Literal["text"] = "text"
    context_id: str = Field(default=None, validate_default=True)
    text: str = Field(default=_MISSING, validate_default=True)
    options: GenerateRequest = Field(default=None, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _options(cls, data: Any) -> Any:
        """Every other field of the message is a generation option of the stream."""
        if not isinstance(data, dict):
            return data
        options = {k: v for k, v in data.items() if k not in ("type", "text", "context_id")}
        return {k: data[k] for k in ("type", "text", "context_id") if k in data} | {"options": options}

    @field_validator("context_id", mode="before")
    @classmethod
    def _context_id(cls, value: Any) -> str:
        return _id_value(value, "context_id") or "default"

    @field_validator("text", mode="before")
    @classmethod
    def _text(cls, value: Any, info: ValidationInfo) -> str:
        return _text_value(value, _limits(info), allow_empty=True)

    @field_validator("options", mode="before")
    @classmethod
    def _stream_options(cls, value: Any, info: ValidationInfo) -> GenerateRequest:
        if isinstance(value, GenerateRequest):
            return value
        context = {**(info.context or {}), "stream_options": True}
        return GenerateRequest.model_validate({**value, "text": ""}, context=context)


class FlushMessage(BaseModel):
    """Speak what is buffered on ``context_id`` (``flush``), and with ``end`` close the stream."""

    model_config = ConfigDict(frozen=True)

    type: Literal["flush", "end"] = "flush"
    context_id: str = Field(default=None, validate_default=True)

    @field_validator("context_id", mode="before")
    @classmethod
    def _context_id(cls, value: Any) -> str:
        return _id_value(value, "context_id") or "default"


class CancelMessage(BaseModel):
    """Stop ``request_id`` (or the streams of ``context_id``, or neither: what streams now)."""

    model_config = ConfigDict(frozen=True)

    type: Literal["cancel"] = "cancel"
    request_id: str | None = None
    context_id: str | None = None

    @field_validator("request_id", "context_id", mode="before")
    @classmethod
    def _id(cls, value: Any, info: ValidationInfo) -> str | None:
        return _id_value(value, info.field_name)


def _message_kind(data: Any) -> str:
    """Which message a frame is, by its ``type`` (``generate`` when absent; ``end`` is a flush)."""
    kind = data.get("type", "generate") if isinstance(data, dict) else getattr(data, "type", None)
    if kind in ("generate", "text", "cancel"):
        return kind
    if kind in ("flush", "end"):
        return "flush"
    raise InvalidRequest(f"unknown message type {kind!r}; expected generate, text, flush, end or cancel")


ClientMessage = Annotated[
    Annotated[GenerateRequest, Tag("generate")]
    | Annotated[TextMessage, Tag("text")]
    | Annotated[FlushMessage, Tag("flush")]
    | Annotated[CancelMessage, Tag("cancel")],
    Discriminator(_message_kind),
]
#: Every client message of ``/ws/generate``, parsed by its ``type`` tag. Validate with
#: ``context={"limits": Limits(...)}``; the validators raise :class:`InvalidRequest` themselves.
CLIENT_MESSAGES: TypeAdapter[GenerateRequest | TextMessage | FlushMessage | CancelMessage] = TypeAdapter(ClientMessage)


def parse_json_object(raw: str | bytes | None) -> dict:
    """Decode one text frame into a JSON object, or raise :class:`InvalidRequest`."""
    return json_object(raw, EXAMPLE)


def _validated(adapter: TypeAdapter, data: dict, limits: Limits):
    try:
        return adapter.validate_python(data, context={"limits": limits})
    except ValidationError as exc:  # not expected: every validator raises InvalidRequest itself
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise InvalidRequest(f"{where}: {first.get('msg')}" if where else str(first.get("msg"))) from None


_GENERATE = TypeAdapter(GenerateRequest)


def parse_generate(data: dict, limits: Limits) -> GenerateRequest:
    """A complete generation request (``text`` required), from a JSON object whose ``type`` is not
    looked at (``POST /generate`` takes only these)."""
    return _validated(_GENERATE, {k: v for k, v in data.items() if k != "type"}, limits)


def parse_client_message(raw: str | bytes | None, limits: Limits) -> GenerateRequest | TextMessage | FlushMessage | CancelMessage:
    """Parse one WebSocket frame into a typed message, or raise :class:`InvalidRequest`."""
    return _validated(CLIENT_MESSAGES, parse_json_object(raw), limits)


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
