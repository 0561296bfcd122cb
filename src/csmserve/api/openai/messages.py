"""The body of OpenAI's ``POST /v1/audio/speech``, validated once, and its translation into speech.

Fields are checked in the order they are declared; the first wrong one is reported as an
:class:`~csmserve.errors.InvalidRequest` naming it (OpenAI's ``param``), in words a client developer
can act on. Unknown fields (``instructions``, ...) are accepted and ignored. Never imports torch.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from csmserve.audio.containers import RESPONSE_FORMATS
from csmserve.config import Settings
from csmserve.errors import InvalidRequest
from csmserve.server.payload import json_object
from csmserve.speech import SpeechRequest
from csmserve.speech.spoken import spoken_text
from csmserve.speech.voices import SPEAKER_NAMES, VoiceBook, VoiceChoice, choose_voice

MODEL_IDS = ("csm-1b", "sesame/csm-1b", "tts-1", "tts-1-hd", "gpt-4o-mini-tts")
#: A valid body, shown in errors about bodies that are not one.
EXAMPLE = '{"model": "tts-1", "input": "Hello", "voice": "alloy"}'
MAX_SEED = 2**63 - 1


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class SpeechBody(BaseModel):
    """What to say (``input``), in which ``voice``, and how the audio leaves (``response_format``,
    ``stream_format``, ``stream``). ``voice`` is resolved on validation: a speaker id ("0".."9"), a
    registered voice (id or name) or one of OpenAI's voice names; it may come as ``{"id": ...}``.
    ``speed`` must be 1.0: CSM speaks at its own pace, and time-stretching would change the voice.

    Validate with :meth:`parse`, which gives the validators the server's limits and voices."""

    model_config = ConfigDict(frozen=True, extra="ignore", arbitrary_types_allowed=True)

    model: str = Field(default=None, validate_default=True)
    input: str = Field(default=None, validate_default=True)
    response_format: str = "mp3"
    speed: float = 1.0
    stream_format: Literal["audio", "sse"] = "audio"
    #: A csmserve extension: true streams, false answers one file; None leaves it to the client (the route).
    stream: bool | None = None
    voice: VoiceChoice = Field(default=None, validate_default=True)
    seed: int | None = None

    @classmethod
    def parse(cls, raw: str, settings: Settings, voices: VoiceBook) -> SpeechBody:
        """The body of a request, or :class:`InvalidRequest` for the first thing wrong with it."""
        return cls.model_validate(json_object(raw, EXAMPLE), context={"settings": settings, "voices": voices})

    @field_validator("model", mode="before")
    @classmethod
    def _model(cls, value: Any) -> str:
        if value not in MODEL_IDS:
            raise InvalidRequest(f"model must be one of {', '.join(MODEL_IDS)}", "model")
        return value

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, value: Any, info: ValidationInfo) -> str:
        if not isinstance(value, str) or not value.strip():
            raise InvalidRequest("input must be a non-empty string", "input")
        limit = info.context["settings"].max_text_chars
        if len(value) > limit:
            raise InvalidRequest(f"input is {len(value)} characters; the limit is {limit}", "input")
        return value

    @field_validator("response_format", mode="before")
    @classmethod
    def _response_format(cls, value: Any) -> str:
        if value not in RESPONSE_FORMATS:
            raise InvalidRequest(f"response_format must be one of {', '.join(RESPONSE_FORMATS)}", "response_format")
        return value

    @field_validator("speed", mode="before")
    @classmethod
    def _speed(cls, value: Any) -> float:
        if not _is_number(value) or not 0.25 <= value <= 4.0:
            raise InvalidRequest("speed must be a number from 0.25 to 4.0", "speed")
        if value != 1.0:
            raise InvalidRequest("speed other than 1.0 is not supported: CSM speaks at its own pace", "speed")
        return float(value)

    @field_validator("stream_format", mode="before")
    @classmethod
    def _stream_format(cls, value: Any) -> str:
        if value not in ("audio", "sse"):
            raise InvalidRequest("stream_format must be audio or sse", "stream_format")
        return value

    @field_validator("stream", mode="before")
    @classmethod
    def _stream(cls, value: Any) -> bool | None:
        if value is not None and not isinstance(value, bool):
            raise InvalidRequest("stream must be true or false", "stream")
        return value

    @field_validator("voice", mode="before")
    @classmethod
    def _voice(cls, value: Any, info: ValidationInfo) -> VoiceChoice:
        if isinstance(value, dict):
            value = value.get("id")
        voices = info.context["voices"]
        if value is None and voices.default is not None:
            return VoiceChoice()  # no voice named: the server's default voice (CSM_DEFAULT_VOICE)
        if not isinstance(value, str) or not value:
            raise InvalidRequest(
                'voice must be a speaker id ("0"-"9"), a registered voice, or an OpenAI voice name', "voice"
            )
        choice = choose_voice(value, voices, speaker_names=True)
        if choice is None:
            raise InvalidRequest(
                f'unknown voice {value!r}: use a speaker id ("0"-"9"), a registered voice (GET /v1/voices), '
                f"or one of {', '.join(SPEAKER_NAMES)}",
                "voice",
            )
        settings = info.context["settings"]
        if choice.speaker_id is not None and not settings.min_speaker_id <= choice.speaker_id <= settings.max_speaker_id:
            raise InvalidRequest(
                f"voice {value!r} is not a speaker id from {settings.min_speaker_id} to {settings.max_speaker_id}",
                "voice",
            )
        return choice

    @field_validator("seed", mode="before")
    @classmethod
    def _seed(cls, value: Any) -> int | None:
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEED):
            raise InvalidRequest(f"seed must be an integer from 0 to {MAX_SEED}", "seed")
        return value

    def to_speech_request(self, request_id: str | None, tenant: str | None = None) -> SpeechRequest:
        """What to say (the input's spoken form: OpenAI's API has no switch for it), in the chosen
        voice (a registered voice speaks as its own speaker), for ``tenant``."""
        return SpeechRequest(
            text=spoken_text(self.input), speaker_id=self.voice.speaker_id, voice=self.voice.voice, seed=self.seed,
            request_id=request_id, tenant=tenant,
        )

