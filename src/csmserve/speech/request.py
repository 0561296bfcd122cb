"""The one request every API translates its messages into: what to say, in which voice, how.

Each API (``csmserve.api.<name>``) validates its own wire messages and builds a
:class:`SpeechRequest`; nothing below the APIs knows their messages. A request is plain data and
trusted: validation is the translating API's, with messages in that API's own words.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Turn:
    """An earlier turn of the conversation, as CSM context: ``audio`` is mono 16-bit little-endian
    PCM at 24 kHz (optional: a text-only turn still sets the prosody)."""

    speaker_id: int
    text: str
    audio: bytes | None = None


@dataclass(frozen=True)
class SpeechRequest:
    """One utterance to synthesise.

    ``text`` is what the engine says: the API has already made it speakable (numbers, dates and
    symbols as words: :func:`~csmserve.speech.spoken.spoken_text`, unless the request turned that off).
    ``voice`` is a voice string (:class:`~csmserve.speech.voices.VoiceBook`: a registered voice's id
    or name, a mapped name, ``default``); its clip and transcript go first as context. ``speaker_id``
    None: the voice's own speaker. Neither: the server's default voice when one is set, else speaker 0
    (a bare speaker id). ``max_audio_ms`` None: a budget derived from the text (``Settings.audio_budget_ms``).
    ``request_id`` names the request in the engine and the log. ``tenant`` is whom the request acts
    for (:func:`csmserve.server.auth.tenant_of`: an API key's id, or a client address): the engine
    shares its rows between tenants in turn and never reuses one tenant's cached prompt for another.
    """

    text: str
    speaker_id: int | None = None
    voice: str | None = None
    max_audio_ms: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    seed: int | None = None
    request_id: str | None = None
    context: tuple[Turn, ...] = ()
    tenant: str | None = None

    def saying(self, text: str) -> SpeechRequest:
        """The same request for another ``text`` (one sentence of a stream)."""
        return replace(self, text=text)
