"""Raw protocol encodings: s16le at six rates and G.711 at 8 kHz, streamed in 80 ms frames."""

from __future__ import annotations

import audioop  # stdlib up to 3.12; the audioop-lts dev dependency provides it from 3.13 on

import numpy as np
import pytest
import soxr

from csmserve.audio.formats import PCM_RATES, G711Encoder, Pcm16Encoder, make_encoder
from csmserve.audio.pcm import float_to_pcm16
from csmserve.audio.resample import StreamingResampler

FRAME = 1920  # one 80 ms model frame at 24 kHz


def _voice(seconds: float = 1.5) -> np.ndarray:
    t = np.arange(int(seconds * 24_000)) / 24_000
    return (0.5 * np.sin(2 * np.pi * 220 * t) + 0.25 * np.sin(2 * np.pi * 1700 * t)).astype(np.float32)


def _stream(encoder, signal: np.ndarray) -> bytes:
    out = [encoder.encode(signal[i : i + FRAME]) for i in range(0, signal.size, FRAME)]
    return b"".join(out) + encoder.flush()


def _resampled_pcm16(signal: np.ndarray, rate: int) -> np.ndarray:
    """The same 24 kHz -> rate path the encoders take, through the same 80 ms chunks."""
    resampler = StreamingResampler(24_000, rate)
    pieces = [resampler.process(signal[i : i + FRAME]) for i in range(0, signal.size, FRAME)]
    return float_to_pcm16(np.concatenate([*pieces, resampler.flush()]))


@pytest.mark.parametrize("rate", PCM_RATES)
def test_pcm_stream_matches_one_shot_resampling(rate):
    """Streamed s16le equals the one-shot soxr resample converted to int16, within one LSB."""
    signal = _voice()
    streamed = np.frombuffer(_stream(make_encoder("pcm_s16le", rate), signal), dtype="<i2")
    whole = float_to_pcm16(soxr.resample(signal, 24_000, rate))
    assert abs(streamed.size - whole.size) <= 2
    n = min(streamed.size, whole.size)
    assert np.abs(streamed[:n].astype(np.int32) - whole[:n]).max() <= 1


@pytest.mark.parametrize("rate", PCM_RATES)
def test_pcm_byte_length_is_two_bytes_per_output_sample(rate):
    """1.5 s of audio is 2 * 1.5 * rate bytes (give or take two samples), always a whole sample."""
    data = _stream(make_encoder("pcm_s16le", rate), _voice())
    assert len(data) % 2 == 0
    assert abs(len(data) // 2 - 1.5 * rate) <= 2


def test_pcm_at_24k_is_the_model_output_converted():
    """At the model's own rate nothing is resampled and every frame comes out at once."""
    signal = _voice(0.24)
    encoder = make_encoder("pcm_s16le", 24_000)
    frames = [encoder.encode(signal[i : i + FRAME]) for i in range(0, signal.size, FRAME)]
    assert [len(f) for f in frames] == [2 * FRAME] * 3
    assert b"".join(frames) == float_to_pcm16(signal).tobytes()
    assert encoder.flush() == b""


def test_loud_input_clips_instead_of_wrapping():
    """Where the resampled signal is beyond full scale the output sits at 32767 / -32768, never wrapped."""
    t = np.arange(24_000) / 24_000
    loud = (1.5 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    pcm = np.frombuffer(_stream(make_encoder("pcm_s16le", 16000), loud), dtype="<i2")
    ideal = soxr.resample(loud, 24_000, 16000)[: pcm.size]
    assert (pcm[: ideal.size][ideal > 1.0] == 32767).all()
    assert (pcm[: ideal.size][ideal < -1.0] == -32768).all()


@pytest.mark.parametrize(("fmt", "law"), [("mulaw", audioop.lin2ulaw), ("alaw", audioop.lin2alaw)])
def test_g711_payload_is_audioops_encoding_of_the_resampled_pcm(fmt, law):
    """mulaw/alaw bytes equal audioop's encoding of the 8 kHz int16 stream, one byte per sample."""
    signal = _voice()
    data = _stream(make_encoder(fmt, 8000), signal)
    assert data == law(_resampled_pcm16(signal, 8000).tobytes(), 2)
    assert abs(len(data) - 1.5 * 8000) <= 2


@pytest.mark.parametrize(
    ("fmt", "rate", "media_type", "cls"),
    [
        ("pcm_s16le", 16000, "audio/pcm", Pcm16Encoder),
        ("mulaw", 8000, "audio/PCMU", G711Encoder),
        ("alaw", 8000, "audio/PCMA", G711Encoder),
    ],
)
def test_encoders_announce_media_type_and_rate(fmt, rate, media_type, cls):
    """Each encoder says what it sends: its media type and its sample rate."""
    encoder = make_encoder(fmt, rate)
    assert isinstance(encoder, cls)
    assert (encoder.media_type, encoder.sample_rate) == (media_type, rate)


@pytest.mark.parametrize(
    ("fmt", "rate", "message"),
    [
        ("mulaw", 16000, "mulaw is only available at 8000 Hz"),
        ("alaw", 24000, "alaw is only available at 8000 Hz"),
        ("pcm_s16le", 11025, "sample_rate must be one of 8000, 16000, 22050, 24000, 44100, 48000"),
        ("opus", 24000, "format must be one of pcm_s16le, mulaw, alaw"),
    ],
)
def test_unsupported_combinations_are_refused_with_a_clear_message(fmt, rate, message):
    """make_encoder raises ValueError naming what is allowed."""
    with pytest.raises(ValueError, match=message):
        make_encoder(fmt, rate)
