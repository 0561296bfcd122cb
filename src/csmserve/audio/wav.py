"""WAV containers (through soundfile/libsndfile, not by hand)."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf


def pcm16_to_wav(pcm: bytes, sample_rate: int) -> bytes:
    """Mono s16le bytes to a complete 16-bit PCM WAV file."""
    samples = np.frombuffer(pcm, dtype="<i2")
    buffer = io.BytesIO()
    sf.write(buffer, samples, sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()
