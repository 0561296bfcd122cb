"""What an ElevenLabs ``voice_id`` names: a CSM speaker id ("0".."9"), a registered voice (id or
name), an id the operator mapped to one (``CSM_VOICE_MAP``) or ``default``. The list a client picks them
from is the voice library's (:mod:`csmserve.api.voices`)."""

from __future__ import annotations

from csmserve.config import Settings
from csmserve.speech.voices import VoiceBook, VoiceChoice, choose_voice


def voice_of(voice_id: str, voices: VoiceBook, settings: Settings) -> VoiceChoice | None:
    """The voice an ElevenLabs ``voice_id`` names: a speaker id "0".."9" (within the server's range), a
    registered voice (id or name), a mapped id or ``default``; None when there is no such voice."""
    choice = choose_voice(voice_id, voices)
    if choice is not None and choice.speaker_id is not None:
        return choice if settings.min_speaker_id <= choice.speaker_id <= settings.max_speaker_id else None
    return choice


def voice_not_found(voice_id: str) -> str:
    return (
        f"A voice with voice_id {voice_id[:64]!r} was not found: use a speaker id \"0\"-\"9\" "
        "or a registered voice (GET /v1/voices)"
    )
