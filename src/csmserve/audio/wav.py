"""WAV containers (through soundfile/libsndfile, not by hand)."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf

SUBTYPES = {"pcm_s16le": "PCM_16", "mulaw": "ULAW", "alaw": "ALAW"}


def pcm16_to_wav(pcm: bytes, sample_rate: int, encoding: str = "pcm_s16le") -> bytes:
    """Mono s16le bytes to a complete WAV file, stored as 16-bit PCM, µ-law or A-law (``encoding``)."""
    samples = np.frombuffer(pcm, dtype="<i2")
    buffer = io.BytesIO()
    sf.write(buffer, samples, sample_rate, format="WAV", subtype=SUBTYPES[encoding])
    return buffer.getvalue()
