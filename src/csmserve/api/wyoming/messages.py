"""Wyoming's text-to-speech events as csmserve reads and answers them.

The events are the ``wyoming`` package's (``describe``/``info``, ``synthesize``, the streaming
``synthesize-start``/``-chunk``/``-stop``/``-stopped``, ``audio-start``/``-chunk``/``-stop``,
``error``, ``ping``/``pong``). What a client sends is checked here with pydantic (the package's
dataclasses take any JSON), and translated: a Wyoming voice into csmserve's
:class:`~csmserve.speech.voices.VoiceChoice`, text into a :class:`~csmserve.speech.SpeechRequest`.
Everything here raises only :class:`~csmserve.errors.InvalidRequest`. Never imports torch.

Audio goes out as Wyoming's raw PCM: 16-bit little-endian mono at 24 kHz, the model's rate (the
protocol has no field in which a client could ask for another).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, StrictStr, ValidationError
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Attribution, Info, TtsProgram, TtsVoice

from csmserve import __version__
from csmserve.config import Settings
from csmserve.errors import CsmServeError, InvalidRequest
from csmserve.speech import SpeechRequest
from csmserve.speech.voices import VoiceBook, VoiceChoice, choose_voice

RATE, WIDTH, CHANNELS = 24_000, 2, 1
#: CSM-1B speaks English.
LANGUAGES = ["en"]
#: Who made the voices: the model's authors.
MODEL = Attribution(name="Sesame", url="https://huggingface.co/sesame/csm-1b")


class VoiceData(BaseModel):
    """Wyoming's ``voice``: a ``name`` from ``info`` (or only a ``language``), and a ``speaker``."""

    model_config = ConfigDict(extra="ignore")

    name: StrictStr | None = None
    language: StrictStr | None = None
    speaker: StrictStr | None = None


class SynthesizeData(BaseModel):
    """``synthesize``: the whole text."""

    model_config = ConfigDict(extra="ignore")

    text: StrictStr
    voice: VoiceData | None = None


class StartData(BaseModel):
    """``synthesize-start``: the voice of the text that ``synthesize-chunk`` events will bring."""

    model_config = ConfigDict(extra="ignore")

    voice: VoiceData | None = None


class ChunkData(BaseModel):
    """``synthesize-chunk``: a fragment of the text (an LLM's tokens)."""

    model_config = ConfigDict(extra="ignore")

    text: StrictStr


def parse(model: type[BaseModel], event: Event) -> Any:
    """``event``'s data as ``model``, or :class:`InvalidRequest` naming the first field at fault."""
    try:
        return model.model_validate(event.data or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "data"
        raise InvalidRequest(f"{event.type}: {where}: {first.get('msg')}") from None


def check_text(text: str, settings: Settings) -> str:
    """``text`` within ``max_text_chars`` (the limit of one ``synthesize``, as of every route)."""
    if len(text) > settings.max_text_chars:
        raise InvalidRequest(f"text is {len(text)} characters; the limit is {settings.max_text_chars}")
    return text


def voice_of(voice: VoiceData | None, voices: VoiceBook, settings: Settings) -> VoiceChoice:
    """The voice a Wyoming ``voice`` names: a speaker id ("0".."9") or a registered voice (id or name),
    as ``info`` lists them; none (or a language only): speaker 0. Raises :class:`InvalidRequest` for a
    voice that does not exist, a ``speaker`` (csmserve's voices have none) or a language but English."""
    if voice is None:
        return VoiceChoice()
    if voice.speaker is not None:
        raise InvalidRequest("csmserve's voices have no speakers: choose a voice by its name (describe lists them)")
    if voice.name is None:
        if voice.language is not None and voice.language.replace("_", "-").split("-")[0].lower() != "en":
            raise InvalidRequest(f"language {voice.language[:32]!r} is not spoken here: CSM-1B speaks English (en)")
        return VoiceChoice()
    choice = choose_voice(voice.name, voices)
    if choice is not None and choice.speaker_id is not None:
        if not settings.min_speaker_id <= choice.speaker_id <= settings.max_speaker_id:
            choice = None
    if choice is None:
        raise InvalidRequest(
            f"unknown voice {voice.name[:64]!r}: use a speaker id "
            f"{settings.min_speaker_id}-{settings.max_speaker_id} or a registered voice (describe lists them)"
        )
    return choice


def voice_label(choice: VoiceChoice) -> str:
    """How a voice is named in the log: the registered voice, or the speaker id (0 when none was asked)."""
    return choice.voice or str(choice.speaker_id or 0)


def speech_request(choice: VoiceChoice, text: str, request_id: str) -> SpeechRequest:
    return SpeechRequest(text=text, speaker_id=choice.speaker_id, voice=choice.voice, request_id=request_id)


def info_event(voices: VoiceBook, settings: Settings) -> Event:
    """The answer to ``describe``: one text-to-speech program whose voices are the speaker ids (not
    fixed voices: the base model picks one per request) and the registered voices (their id as the
    name, their own name as the description), English, streaming supported."""
    speakers = [
        TtsVoice(
            name=str(speaker), description=f"Speaker {speaker} (changes per request without a reference clip)",
            attribution=MODEL, installed=True, version=None, languages=LANGUAGES,
        )
        for speaker in range(settings.min_speaker_id, settings.max_speaker_id + 1)
    ]
    registered = [
        TtsVoice(
            name=voice.id, description=voice.name, attribution=MODEL, installed=True, version=None,
            languages=LANGUAGES,
        )
        for voice in sorted(voices.store.list(), key=lambda v: v.name.casefold())
    ]
    program = TtsProgram(
        name="csmserve", description="Sesame CSM-1B on csmserve", attribution=MODEL, installed=True,
        version=__version__, voices=speakers + registered, supports_synthesize_streaming=True,
    )
    return Info(tts=[program]).event()


def error_event(error: CsmServeError) -> Event:
    """Wyoming's ``error`` for ``error``: its message for a person, its code for a program."""
    public = error.to_dict()
    return Error(text=public["message"], code=public["code"]).event()


class AudioOut:
    """One audio stream's events: ``audio-start`` before its first chunk, ``audio-chunk``s stamped with
    the milliseconds of audio before them, ``audio-stop`` (after an ``audio-start``, even if no chunk
    came). Plain logic; one per stream."""

    def __init__(self):
        self.started = False
        self.samples = 0

    def _start(self) -> list[Event]:
        if self.started:
            return []
        self.started = True
        return [AudioStart(rate=RATE, width=WIDTH, channels=CHANNELS, timestamp=0).event()]

    def chunk(self, pcm: bytes) -> list[Event]:
        """The events that carry ``pcm`` (16-bit mono at :data:`RATE`; empty: none)."""
        if not pcm:
            return []
        timestamp = 1000 * self.samples // RATE
        self.samples += len(pcm) // (WIDTH * CHANNELS)
        return [*self._start(), AudioChunk(rate=RATE, width=WIDTH, channels=CHANNELS, audio=pcm, timestamp=timestamp).event()]

    def stop(self) -> list[Event]:
        return [*self._start(), AudioStop(timestamp=1000 * self.samples // RATE).event()]
