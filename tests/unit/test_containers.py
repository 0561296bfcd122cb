"""Speech-endpoint containers: 2 s of 440 Hz streamed in 80 ms frames decodes back to 2 s of 440 Hz;
whole files carry the headers that need the length, and two independent readers agree on it."""

from __future__ import annotations

import io
import struct

import av
import numpy as np
import pytest
import soundfile as sf

from csmserve.audio.containers import (
    CODEC_FORMATS,
    WAV_HEADER_BYTES,
    make_container_encoder,
    streaming_wav_header,
)
from csmserve.audio.pcm import float_to_pcm16
from support.audio_files import adts_samples, flac_streaminfo, pyav_samples, soundfile_samples, wav_sizes

FRAME = 1920  # one 80 ms model frame at 24 kHz
SECONDS = 2.0
# What decoders play back at: Ogg Opus always decodes at 48 kHz.
DECODED_RATE = {"mp3": 24_000, "opus": 48_000, "aac": 24_000, "flac": 24_000}
# Encoder delay and frame padding: mp3 adds ~64 ms here, aac ~48 ms.
DURATION_SLACK_S = 0.1


def _tone(seconds: float = SECONDS, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * 24_000)) / 24_000
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _encode_in_frames(encoder, signal: np.ndarray) -> list[bytes]:
    """What encode returned for each 80 ms frame, then what flush returned."""
    return [encoder.encode(signal[i : i + FRAME]) for i in range(0, signal.size, FRAME)] + [encoder.flush()]


def _decode(data: bytes) -> tuple[np.ndarray, int]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        frames = [frame.to_ndarray().reshape(frame.samples, -1)[:, 0] for frame in container.decode(stream)]
        return np.concatenate(frames).astype(np.float64), stream.codec_context.sample_rate


def _dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(samples.size)))
    return float(np.fft.rfftfreq(samples.size, 1 / rate)[spectrum.argmax()])


@pytest.mark.parametrize("fmt", sorted(CODEC_FORMATS))
def test_compressed_stream_decodes_to_the_same_tone(fmt):
    """mp3/opus/aac/flac: the decoded stream has the expected rate, ~2 s, and a peak at 440 Hz."""
    data = b"".join(_encode_in_frames(make_container_encoder(fmt), _tone()))
    samples, rate = _decode(data)
    assert rate == DECODED_RATE[fmt]
    assert abs(samples.size / rate - SECONDS) <= DURATION_SLACK_S
    assert abs(_dominant_hz(samples, rate) - 440) <= 2


@pytest.mark.parametrize("fmt", sorted(CODEC_FORMATS))
def test_compressed_stream_starts_within_two_frames(fmt):
    """Bytes flow while audio is still coming: the first arrive with frame 1 or 2, most before flush."""
    pieces = _encode_in_frames(make_container_encoder(fmt), _tone())
    first = next(i for i, piece in enumerate(pieces) if piece)
    assert first <= 1
    assert sum(map(len, pieces[:-1])) > 0.8 * sum(map(len, pieces))


def test_flac_decodes_losslessly():
    """flac gives back exactly the int16 samples it was given."""
    signal = _tone()
    data = b"".join(_encode_in_frames(make_container_encoder("flac"), signal))
    # PyAV, not soundfile: a streamed flac's STREAMINFO says "unknown" (0 samples), which libsndfile
    # takes at face value; the whole-file form below is for readers like it.
    decoded, rate = _decode(data)
    assert rate == 24_000
    np.testing.assert_array_equal(decoded, float_to_pcm16(signal))


def test_wav_stream_header_fields():
    """RIFF/WAVE, PCM, mono, 24 kHz, 16-bit, and 0xFFFFFFFF for both sizes (length unknown)."""
    header = streaming_wav_header(24_000)
    assert len(header) == WAV_HEADER_BYTES == 44
    riff, riff_size, wave = struct.unpack_from("<4sI4s", header, 0)
    fmt_id, fmt_size, audio_format, channels, rate, byte_rate, block_align, bits = struct.unpack_from(
        "<4sIHHIIHH", header, 12
    )
    data_id, data_size = struct.unpack_from("<4sI", header, 36)
    assert (riff, riff_size, wave) == (b"RIFF", 0xFFFFFFFF, b"WAVE")
    assert (fmt_id, fmt_size, audio_format, channels) == (b"fmt ", 16, 1, 1)
    assert (rate, byte_rate, block_align, bits) == (24_000, 48_000, 2, 16)
    assert (data_id, data_size) == (b"data", 0xFFFFFFFF)


def test_wav_stream_is_header_then_pcm_and_readable():
    """The header comes with the first frame, then plain s16le; soundfile reads it to the end."""
    signal = _tone()
    pieces = _encode_in_frames(make_container_encoder("wav"), signal)
    assert pieces[0][:WAV_HEADER_BYTES] == streaming_wav_header(24_000)
    assert len(pieces[0]) == WAV_HEADER_BYTES + 2 * FRAME
    data = b"".join(pieces)
    assert data[WAV_HEADER_BYTES:] == float_to_pcm16(signal).tobytes()
    decoded, rate = sf.read(io.BytesIO(data), dtype="int16")
    assert rate == 24_000 and decoded.size == signal.size


def test_wav_without_audio_is_still_a_header():
    """An utterance that produced no audio still answers with a well-formed (empty) wav."""
    assert make_container_encoder("wav").flush() == streaming_wav_header(24_000)


def test_pcm_is_raw_s16le_at_24k():
    """pcm is the int16 samples, nothing around them, frame by frame."""
    signal = _tone(0.24)
    pieces = _encode_in_frames(make_container_encoder("pcm"), signal)
    assert [len(p) for p in pieces] == [2 * FRAME] * 3 + [0]
    assert b"".join(pieces) == float_to_pcm16(signal).tobytes()


@pytest.mark.parametrize(
    ("fmt", "media_type"),
    [
        ("mp3", "audio/mpeg"),
        ("opus", "audio/ogg"),
        ("aac", "audio/aac"),
        ("flac", "audio/flac"),
        ("wav", "audio/wav"),
        ("pcm", "audio/pcm"),
    ],
)
def test_media_types(fmt, media_type):
    """Each response format announces the media type the endpoint's Content-Type should carry."""
    encoder = make_container_encoder(fmt)
    assert (encoder.media_type, encoder.sample_rate) == (media_type, 24_000)


def test_unknown_response_format_is_refused():
    """ValueError lists the formats that exist."""
    with pytest.raises(ValueError, match="mp3, opus, aac, flac, wav, pcm"):
        make_container_encoder("ogg")


def test_bundled_ffmpeg_has_the_encoders():
    """The installed PyAV wheel carries every encoder the table names."""
    assert {spec.codec for spec in CODEC_FORMATS.values()} <= av.codecs_available


# An odd length (not a whole number of frames or codec blocks), as a real utterance has.
ODD_LENGTH = 24_000 * 2 + 13
# Samples a whole file may decode to beyond the input: mp3 can keep part of a 576-sample granule; ADTS
# cannot state aac's 1024-sample priming or its last frame's padding (up to 1023).
EXTRA_SAMPLES = {"wav": 0, "flac": 0, "opus": 0, "mp3": 576, "aac": 2047}


def _noise(n: int = ODD_LENGTH) -> np.ndarray:
    return (0.3 * np.random.default_rng(7).standard_normal(n)).clip(-1, 1).astype(np.float32)


def _whole(fmt: str, signal: np.ndarray) -> bytes:
    pieces = _encode_in_frames(make_container_encoder(fmt, whole_file=True), signal)
    assert not any(pieces[:-1]), "a whole file leaves in one piece, when it is complete"
    return pieces[-1]


@pytest.mark.parametrize("fmt", sorted(EXTRA_SAMPLES))
def test_whole_file_decodes_to_the_input_length_in_two_readers(fmt):
    """soundfile (or, for aac, the ADTS headers) and PyAV both read the input's sample count at 24 kHz."""
    signal = _noise()
    data = _whole(fmt, signal)
    first = adts_samples(data) if fmt == "aac" else soundfile_samples(data)
    second = pyav_samples(data)
    for samples, rate in (first, second):
        at_24k = samples * 24_000 // rate  # Ogg Opus decodes at 48 kHz in FFmpeg
        assert signal.size <= at_24k <= signal.size + EXTRA_SAMPLES[fmt], (fmt, samples, rate)


def test_whole_file_flac_streaminfo_has_total_samples_and_md5():
    """The complete flac states its sample count and its samples' MD5; libsndfile reads it losslessly."""
    import hashlib

    signal = _noise()
    data = _whole("flac", signal)
    expected = float_to_pcm16(signal)
    rate, total, md5 = flac_streaminfo(data)
    assert (rate, total) == (24_000, signal.size)
    assert md5 == hashlib.md5(expected.astype("<i2").tobytes()).digest()
    decoded, _ = sf.read(io.BytesIO(data), dtype="int16")
    np.testing.assert_array_equal(decoded, expected)


def test_streamed_flac_says_its_length_is_unknown():
    """A streamed flac never goes back to its header: STREAMINFO says 0 samples, no MD5; FFmpeg reads it."""
    signal = _noise()
    data = b"".join(_encode_in_frames(make_container_encoder("flac"), signal))
    assert flac_streaminfo(data)[1:] == (0, bytes(16))
    assert pyav_samples(data) == (signal.size, 24_000)


def test_whole_file_wav_states_its_sizes():
    """The complete wav's RIFF and data sizes are the file's; the samples follow the header unchanged."""
    signal = _noise()
    data = _whole("wav", signal)
    assert wav_sizes(data) == (len(data) - 8, 2 * signal.size)
    assert data.endswith(float_to_pcm16(signal).tobytes())


def test_whole_file_mp3_has_a_xing_header_and_streamed_mp3_has_none():
    """The complete mp3 starts with a Xing/Info frame (frame count, delay and padding); the stream cannot."""
    signal = _noise()
    whole = _whole("mp3", signal)
    streamed = b"".join(_encode_in_frames(make_container_encoder("mp3"), signal))
    assert b"Info" in whole[:200] or b"Xing" in whole[:200]
    assert b"Info" not in streamed[:200] and b"Xing" not in streamed[:200]


def test_pcm_is_the_same_whole_or_streamed():
    """pcm has no header: the whole-file form is the streamed bytes."""
    signal = _noise(5000)
    whole = b"".join(_encode_in_frames(make_container_encoder("pcm", whole_file=True), signal))
    assert whole == b"".join(_encode_in_frames(make_container_encoder("pcm"), signal))
