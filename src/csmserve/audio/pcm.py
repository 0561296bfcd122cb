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


class Chunker:
    """Accumulates encoded audio bytes and releases chunks of exactly ``chunk_bytes``.

    The first chunk may be shorter (``first_chunk_bytes``) for the lowest latency. Whatever is left
    at the end comes out of :meth:`flush` as one shorter chunk. Nothing is dropped or reordered.
    """

    def __init__(self, chunk_bytes: int, first_chunk_bytes: int | None = None):
        self.chunk_bytes = chunk_bytes
        self._next = first_chunk_bytes or chunk_bytes
        self._pending = bytearray()

    def push(self, data: bytes | np.ndarray) -> Iterator[bytes]:
        if isinstance(data, np.ndarray):
            data = data.astype("<i2", copy=False).tobytes()
        self._pending += data
        while len(self._pending) >= self._next:
            size = self._next
            chunk = bytes(self._pending[:size])
            del self._pending[:size]
            self._next = self.chunk_bytes
            yield chunk

    def flush(self) -> bytes:
        chunk = bytes(self._pending)
        self._pending.clear()
        return chunk
