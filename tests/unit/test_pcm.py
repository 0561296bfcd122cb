"""Float to int16 conversion and exact-size chunking."""

from __future__ import annotations

import numpy as np

from csmserve.audio.pcm import Chunker, float_to_pcm16


def test_out_of_range_samples_clip_instead_of_wrapping():
    """1.5 becomes 32767 and -1.5 becomes -32768, never a sign flip."""
    pcm = float_to_pcm16(np.array([1.5, -1.5, 1.0, -1.0, 0.0, 2e9, np.nan], dtype=np.float32))
    assert pcm.tolist() == [32767, -32768, 32767, -32767, 0, 32767, 0]
    assert pcm.dtype == np.dtype("<i2")


def test_chunker_emits_exact_sizes_and_loses_nothing():
    """Pieces of any size come out as chunk_bytes chunks plus one shorter tail, in order."""
    rng = np.random.default_rng(0)
    pieces = [rng.integers(-3000, 3000, size=n).astype("<i2") for n in (1920, 7, 5000, 1, 1920 * 3)]
    chunker = Chunker(9600)
    chunks = [c for p in pieces for c in chunker.push(p)]
    tail = chunker.flush()
    assert all(len(c) == 9600 for c in chunks)
    assert 0 < len(tail) < 9600
    assert b"".join(chunks) + tail == b"".join(p.tobytes() for p in pieces)


def test_first_chunk_can_be_smaller():
    """first_chunk_bytes applies to the first chunk only."""
    chunker = Chunker(9600, first_chunk_bytes=1920)
    chunks = list(chunker.push(np.zeros(10_000, dtype="<i2")))
    assert [len(c) for c in chunks] == [1920, 9600]
