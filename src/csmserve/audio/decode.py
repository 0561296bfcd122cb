"""Reading uploaded reference clips: any common container, any rate, to mono float32 at 24 kHz."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf
import soxr

from csmserve.errors import InvalidRequest

ACCEPTED = "WAV, FLAC, MP3 or OGG"


def decode_clip(data: bytes, sample_rate: int = 24_000, max_seconds: float = 30.0, min_seconds: float = 0.5) -> np.ndarray:
    """Decode ``data`` (WAV/FLAC/MP3/OGG) to mono float32 at ``sample_rate``.

    Raises :class:`InvalidRequest` for unreadable data and for clips outside ``[min_seconds, max_seconds]``.
    """
    if not data:
        raise InvalidRequest("the audio file is empty")
    try:
        with sf.SoundFile(io.BytesIO(data)) as clip:
            seconds = clip.frames / clip.samplerate
            if seconds > max_seconds:
                raise InvalidRequest(f"the clip is {seconds:.1f} s long; voices accept at most {max_seconds:.0f} s")
            audio = clip.read(dtype="float32", always_2d=True)
            rate = clip.samplerate
    except InvalidRequest:
        raise
    except Exception as exc:  # noqa: BLE001 - libsndfile's errors vary by format
        raise InvalidRequest(f"cannot read the audio file as {ACCEPTED}: {exc}") from None
    mono = audio.mean(axis=1)
    if len(mono) / rate < min_seconds:
        raise InvalidRequest(f"the clip is {len(mono) / rate:.2f} s long; voices need at least {min_seconds} s")
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate, quality="HQ")
    return np.clip(mono, -1.0, 1.0).astype(np.float32)
