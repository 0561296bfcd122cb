"""Streaming resampling: chunked output is the one-shot output, continuous across chunk boundaries."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import soxr

from csmserve.audio.resample import StreamingResampler

SOURCE_RATE = 24_000
OUT_RATES = (8000, 16000, 22050, 44100, 48000)
# soxr filters in internal blocks whatever the caller's chunking, so streamed and one-shot runs do the
# same arithmetic; allow float32 rounding noise, a third of one 16-bit step (1/32768), which can
# never show in the s16 output.
TOLERANCE = 1e-5
# Output lengths may differ by rounding of the rate ratio at the very end.
LENGTH_SLACK = 2
# Uneven on purpose: model frames (1920), single samples, empty and odd-sized chunks.
CHUNK_SIZES = (1920, 1, 7, 0, 333, 1920, 5000, 1919)


def _speech_like(seconds: float = 2.0) -> np.ndarray:
    t = np.arange(int(seconds * SOURCE_RATE)) / SOURCE_RATE
    rng = np.random.default_rng(7)
    tones = 0.4 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3100 * t)
    return (tones + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def _sine(seconds: float = 1.0, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * SOURCE_RATE)) / SOURCE_RATE
    return (0.8 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _chunked(resampler: StreamingResampler, signal: np.ndarray) -> np.ndarray:
    pieces, start = [], 0
    for size in itertools.cycle(CHUNK_SIZES):
        if start >= signal.size:
            break
        pieces.append(resampler.process(signal[start : start + size]))
        start += size
    pieces.append(resampler.flush())
    return np.concatenate(pieces)


@pytest.mark.parametrize("out_rate", OUT_RATES)
def test_chunked_output_matches_one_shot(out_rate):
    """Uneven chunks plus flush give soxr.resample of the whole signal, within TOLERANCE."""
    signal = _speech_like()
    streamed = _chunked(StreamingResampler(SOURCE_RATE, out_rate), signal)
    whole = soxr.resample(signal, SOURCE_RATE, out_rate)
    assert streamed.dtype == np.float32
    assert abs(streamed.size - whole.size) <= LENGTH_SLACK
    n = min(streamed.size, whole.size)
    np.testing.assert_allclose(streamed[:n], whole[:n], rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("out_rate", OUT_RATES)
def test_output_length_follows_the_rate_ratio(out_rate):
    """Two seconds in are two seconds out: n * out_rate / in_rate samples, give or take LENGTH_SLACK."""
    signal = _speech_like()
    streamed = _chunked(StreamingResampler(SOURCE_RATE, out_rate), signal)
    assert abs(streamed.size - signal.size * out_rate / SOURCE_RATE) <= LENGTH_SLACK


@pytest.mark.parametrize("out_rate", OUT_RATES)
def test_no_jump_at_chunk_boundaries(out_rate):
    """A chunked sine never steps further between samples than the one-shot sine does."""
    signal = _sine()
    streamed = _chunked(StreamingResampler(SOURCE_RATE, out_rate), signal)
    whole = soxr.resample(signal, SOURCE_RATE, out_rate)
    assert np.abs(np.diff(streamed)).max() <= np.abs(np.diff(whole)).max() + TOLERANCE


def test_equal_rates_pass_samples_through():
    """24 kHz to 24 kHz returns each chunk unchanged, at once, and flushes nothing."""
    resampler = StreamingResampler(SOURCE_RATE, SOURCE_RATE)
    chunk = _sine()[:1920]
    np.testing.assert_array_equal(resampler.process(chunk), chunk)
    assert resampler.flush().size == 0


def test_flush_starts_a_fresh_stream():
    """After flush the resampler gives the same output for the same input as a new one."""
    signal = _speech_like(0.5)
    resampler = StreamingResampler(SOURCE_RATE, 16000)
    first = _chunked(resampler, signal)
    second = _chunked(resampler, signal)
    np.testing.assert_array_equal(first, second)


def test_non_mono_input_is_refused():
    """A (n, 2) array is a caller bug, not audio to flatten."""
    with pytest.raises(ValueError, match="mono"):
        StreamingResampler(SOURCE_RATE, 16000).process(np.zeros((1920, 2), dtype=np.float32))
