"""Float audio to 16-bit PCM, and a chunker that cuts a stream at exact chunk sizes."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def float_to_pcm16(audio: np.ndarray) -> np.ndarray:
    """float32 samples in [-1, 1] to int16, clipping (never wrapping) what lies outside.

    Scales by 32767 so that +1.0 and -1.0 map to +32767 and -32767; NaN becomes silence.
    """
    samples = np.nan_to_num(np.asarray(audio, dtype=np.float32), nan=0.0, posinf=1.0, neginf=-1.0)
    return np.clip(np.round(samples * 32767.0), -32768, 32767).astype("<i2")


def samples_for_ms(ms: int, sample_rate: int) -> int:
    return sample_rate * ms // 1000


class Chunker:
    """Accumulates int16 samples and releases byte chunks of exactly ``chunk_samples``.

    The first chunk may be shorter (``first_chunk_samples``) for the lowest latency. Whatever is
    left at the end comes out of :meth:`flush` as one shorter chunk. Nothing is dropped or reordered.
    """

    def __init__(self, chunk_samples: int, first_chunk_samples: int | None = None):
        self.chunk_samples = chunk_samples
        self._next = first_chunk_samples or chunk_samples
        self._pending = bytearray()

    def push(self, pcm: np.ndarray) -> Iterator[bytes]:
        self._pending += pcm.astype("<i2", copy=False).tobytes()
        while len(self._pending) >= 2 * self._next:
            size = 2 * self._next
            chunk = bytes(self._pending[:size])
            del self._pending[:size]
            self._next = self.chunk_samples
            yield chunk

    def flush(self) -> bytes:
        chunk = bytes(self._pending)
        self._pending.clear()
        return chunk
