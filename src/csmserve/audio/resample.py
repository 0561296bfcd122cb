"""Streaming sample-rate conversion of one mono float32 stream (soxr, not by hand)."""

from __future__ import annotations

import numpy as np
import soxr

_EMPTY = np.zeros(0, dtype=np.float32)


class StreamingResampler:
    """Resamples a mono float32 stream from ``in_rate`` to ``out_rate`` Hz, chunk by chunk.

    The filter state carries over between calls, so the concatenated outputs of :meth:`process`
    followed by :meth:`flush` match ``soxr.resample`` of the whole signal (same "HQ" filter): no
    clicks at chunk boundaries, and the total length is the one-shot length.

    Output lags input: soxr works in internal blocks, so a call may return fewer samples than
    ``len(chunk) * out_rate / in_rate`` (at 24 kHz -> 8 kHz, the first 80 ms frame gives 490 of 640
    samples) and the remainder arrives with later calls or :meth:`flush`. With equal rates the
    samples pass through untouched and nothing lags.
    """

    def __init__(self, in_rate: int, out_rate: int, quality: str = "HQ"):
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {in_rate} -> {out_rate}")
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._stream = None
        if in_rate != out_rate:
            self._stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality=quality)

    def process(self, samples: np.ndarray) -> np.ndarray:
        """A chunk of shape (n,) at ``in_rate`` in, float32 of shape (m,) at ``out_rate`` out; m may be 0."""
        chunk = np.ascontiguousarray(samples, dtype=np.float32)
        if chunk.ndim != 1:
            raise ValueError(f"expected mono samples of shape (n,), got shape {chunk.shape}")
        if self._stream is None:
            return chunk.copy()
        return self._stream.resample_chunk(chunk)

    def flush(self) -> np.ndarray:
        """The tail still inside the filter at the end of the stream (float32, shape (m,)).

        Afterwards the resampler is reset and the next :meth:`process` starts a new stream.
        """
        if self._stream is None:
            return _EMPTY.copy()
        tail = self._stream.resample_chunk(_EMPTY, last=True)
        self._stream.clear()
        return tail
