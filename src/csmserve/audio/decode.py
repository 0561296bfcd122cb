"""Reading uploaded reference clips: any common container, any rate, to mono float32 at 24 kHz.

An upload is small but its decoded audio need not be (a 200 KB Ogg can declare 255 channels at
192 kHz: gigabytes of float32). The header is checked first (channels, rate, duration), and the
audio is read in blocks and mixed down to mono as it goes, so memory is bounded by the limits.
Blocking: call it off the event loop.
"""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf
import soxr

from csmserve.errors import InvalidRequest

ACCEPTED = "WAV, FLAC, MP3 or OGG"
BLOCK_FRAMES = 65_536


def decode_clip(
    data: bytes,
    sample_rate: int = 24_000,
    max_seconds: float = 30.0,
    min_seconds: float = 0.5,
    *,
    max_channels: int = 2,
    max_rate: int = 48_000,
) -> np.ndarray:
    """Decode ``data`` (WAV/FLAC/MP3/OGG) to mono float32 at ``sample_rate``.

    Raises :class:`InvalidRequest` for unreadable data, for more than ``max_channels`` channels or a
    rate above ``max_rate``, and for clips outside ``[min_seconds, max_seconds]``. Peak memory is
    about ``max_seconds * max_rate`` float32 samples, whatever the file declares.
    """
    if not data:
        raise InvalidRequest("the audio file is empty")
    try:
        clip = sf.SoundFile(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - libsndfile's errors vary by format (and name a heap address)
        raise InvalidRequest(f"cannot read the audio file as {ACCEPTED}") from None
    with clip:
        rate, channels = clip.samplerate, clip.channels
        if channels > max_channels:
            raise InvalidRequest(f"the clip has {channels} channels; voices accept at most {max_channels}")
        if rate > max_rate:
            raise InvalidRequest(f"the clip's sample rate is {rate} Hz; voices accept at most {max_rate} Hz")
        limit = int(max_seconds * rate)
        if clip.frames > limit:
            raise InvalidRequest(f"the clip is {clip.frames / rate:.1f} s long; voices accept at most {max_seconds:.0f} s")
        mono = np.empty(limit + 1, dtype=np.float32)
        filled = 0
        try:
            # The header's length may lie: count what is actually decoded, and stop past the limit.
            for block in clip.blocks(BLOCK_FRAMES, dtype="float32", always_2d=True):
                take = min(len(block), limit + 1 - filled)
                mono[filled : filled + take] = block[:take].mean(axis=1)
                filled += take
                if filled > limit:
                    raise InvalidRequest(f"the clip is longer than {max_seconds:.0f} s; voices accept at most that")
        except InvalidRequest:
            raise
        except Exception:  # noqa: BLE001
            raise InvalidRequest(f"cannot read the audio file as {ACCEPTED}: its data is damaged") from None
    mono = mono[:filled]
    if filled / rate < min_seconds:
        raise InvalidRequest(f"the clip is {filled / rate:.2f} s long; voices need at least {min_seconds} s")
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate, quality="HQ")
    return np.clip(mono, -1.0, 1.0).astype(np.float32)
