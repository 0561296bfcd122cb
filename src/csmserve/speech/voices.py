"""Voice resolution, once for every API: what a client's voice string names, and the context turns
a request's voice becomes.

A voice is a CSM speaker id, a registered voice (its reference clip's codes and transcript, kept by
:class:`~csmserve.voices.VoiceStore`), or a well-known name that stands for a speaker id
(:data:`SPEAKER_NAMES`, OpenAI's voices). Each API chooses which of these it accepts; registration
refuses names that would be read as something else (:func:`reserved_name`).
"""

from __future__ import annotations

from dataclasses import dataclass

from csmserve.engine import ContextTurn
from csmserve.errors import InvalidRequest
from csmserve.voices import ID_PATTERN, VoiceStore, latin_skeleton

#: OpenAI's voice names -> CSM speaker ids (alphabetical order of OpenAI's list). Only the OpenAI API
#: accepts them, but no registered voice may take one, so that a name means one thing everywhere.
SPEAKER_NAMES = {
    "alloy": 0, "ash": 1, "ballad": 2, "coral": 3, "echo": 4,
    "fable": 5, "nova": 6, "onyx": 7, "sage": 8, "shimmer": 9, "verse": 0,
}  # fmt: skip


@dataclass(frozen=True)
class VoiceChoice:
    """What a voice string named: a ``speaker_id`` (range not checked) or a registered ``voice``."""

    speaker_id: int | None = None
    voice: str | None = None


def choose_voice(name: str, voices: VoiceStore, *, speaker_names: bool = False) -> VoiceChoice | None:
    """What ``name`` names, first match wins: ASCII digits (at most 4) a speaker id; a registered voice
    (id or name); with ``speaker_names``, one of :data:`SPEAKER_NAMES` (any case). None: nothing."""
    if name.isascii() and name.isdigit() and len(name) <= 4:
        return VoiceChoice(speaker_id=int(name))
    if voices.get(name) is not None:
        return VoiceChoice(voice=name)
    if speaker_names and name.lower() in SPEAKER_NAMES:
        return VoiceChoice(speaker_id=SPEAKER_NAMES[name.lower()])
    return None


def speaker_of(choice: VoiceChoice, voices: VoiceStore) -> int:
    """The speaker id a choice speaks with (a registered voice's own; 0 if it was deleted meanwhile,
    when the request fails anyway)."""
    if choice.speaker_id is not None:
        return choice.speaker_id
    voice = voices.get(choice.voice)
    return voice.speaker_id if voice is not None else 0


def reserved_name(name: str) -> bool:
    """Whether a new voice may not take ``name``: a speaker name, a speaker id or a voice id, or
    something that reads as one (compared by :func:`~csmserve.voices.latin_skeleton`: ``ａｌｌｏｙ``,
    a Cyrillic ``аllоу``)."""
    seen = latin_skeleton(name)
    return seen in SPEAKER_NAMES or seen.isdigit() or ID_PATTERN.match(seen) is not None


def voice_turns(name: str | None, voices: VoiceStore) -> tuple[int | None, tuple[ContextTurn, ...]]:
    """A registered voice's speaker id and its context turn (the clip's codes); ``(None, ())`` for no
    voice. Raises :class:`InvalidRequest` for a name that is not (or no longer) registered."""
    if name is None:
        return None, ()
    voice = voices.get(name)
    if voice is None:
        raise InvalidRequest(f"unknown voice {name!r}; list voices with GET /v1/voices", "voice")
    return voice.speaker_id, (ContextTurn(voice.speaker_id, voice.transcript, codes=voices.codes(voice.id)),)
