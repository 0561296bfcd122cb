"""Voices as ElevenLabs names them (``voice_id``) and lists them (``GET /v1/voices`` → ``{"voices": [{"voice_id", "name", ...}]}``).

CSM's speaker ids come first as "premade" voices ("0".."9"), then the registered voices as
"cloned" ones, so a framework's voice picker (or the SDK's ``voices.get_all()``) finds both.
"""

from __future__ import annotations

from csmserve.config import Settings
from csmserve.speech.voices import VoiceChoice, choose_voice
from csmserve.voices import VoiceStore


def elevenlabs_voices(voices, min_speaker_id: int, max_speaker_id: int) -> list[dict]:
    """``voices``: the registered :class:`~csmserve.voices.Voice` objects."""
    speakers = [
        {"voice_id": str(i), "name": f"CSM speaker {i}", "category": "premade", "labels": {}}
        for i in range(min_speaker_id, max_speaker_id + 1)
    ]
    registered = [
        {"voice_id": v.id, "name": v.name, "category": "cloned", "labels": {"speaker_id": str(v.speaker_id)}}
        for v in voices
    ]
    return speakers + registered


def voice_of(voice_id: str, voices: VoiceStore, settings: Settings) -> VoiceChoice | None:
    """The voice an ElevenLabs ``voice_id`` names: a speaker id "0".."9" (within the server's range) or
    a registered voice (id or name); None when there is no such voice."""
    choice = choose_voice(voice_id, voices)
    if choice is not None and choice.speaker_id is not None:
        return choice if settings.min_speaker_id <= choice.speaker_id <= settings.max_speaker_id else None
    return choice


def voice_not_found(voice_id: str) -> str:
    return (
        f"A voice with voice_id {voice_id[:64]!r} was not found: use a speaker id \"0\"-\"9\" "
        "or a registered voice (GET /v1/voices)"
    )
