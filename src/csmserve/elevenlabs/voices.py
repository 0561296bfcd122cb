"""Voices as ElevenLabs lists them (``GET /v1/voices`` → ``{"voices": [{"voice_id", "name", ...}]}``).

CSM's speaker ids come first as "premade" voices ("0".."9"), then the registered voices as
"cloned" ones, so a framework's voice picker (or the SDK's ``voices.get_all()``) finds both.
"""

from __future__ import annotations


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
