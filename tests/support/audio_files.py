"""Two independent readers for every response format, and the header fields a complete file must carry.

soundfile (libsndfile: wav, flac, mp3 through mpg123, Ogg Opus) and PyAV (FFmpeg) share no decoding code.
libsndfile has no AAC, so ADTS is also walked here frame by frame: its headers alone give the sample count.
"""

from __future__ import annotations

import io
import struct

import av
import soundfile as sf

ADTS_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)


def soundfile_samples(data: bytes) -> tuple[int, int]:
    """(samples decoded, sample rate) through libsndfile; it raises on a file it cannot read."""
    samples, rate = sf.read(io.BytesIO(data), dtype="int16")
    return len(samples), rate


def pyav_samples(data: bytes) -> tuple[int, int]:
    """(samples decoded, sample rate) through FFmpeg."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        return sum(frame.samples for frame in container.decode(stream)), stream.codec_context.sample_rate


def adts_samples(data: bytes) -> tuple[int, int]:
    """(samples, rate) from an ADTS stream's frame headers: 1024 samples per raw data block."""
    position, samples, rate = 0, 0, None
    while position < len(data):
        header = data[position : position + 7]
        synced = len(header) == 7 and header[0] == 0xFF and header[1] & 0xF0 == 0xF0
        assert synced, f"no ADTS frame at byte {position}"
        rate = ADTS_RATES[(header[2] >> 2) & 0x0F]
        length = ((header[3] & 0x03) << 11) | (header[4] << 3) | (header[5] >> 5)
        samples += 1024 * ((header[6] & 0x03) + 1)
        position += length
    return samples, rate


def flac_streaminfo(data: bytes) -> tuple[int, int, bytes]:
    """(sample rate, total samples, MD5 of the samples) from a FLAC file's STREAMINFO block."""
    assert data[:4] == b"fLaC"
    assert data[4] & 0x7F == 0 and int.from_bytes(data[5:8], "big") == 34, "STREAMINFO must come first"
    info = data[8:42]
    packed = int.from_bytes(info[10:18], "big")  # rate: 20 bits, channels-1: 3, bits-1: 5, total samples: 36
    return packed >> 44, packed & ((1 << 36) - 1), info[18:34]


def wav_sizes(data: bytes) -> tuple[int, int]:
    """(RIFF chunk size, data chunk size) as a WAV file's header states them."""
    riff, riff_size, wave = struct.unpack_from("<4sI4s", data, 0)
    assert (riff, wave) == (b"RIFF", b"WAVE")
    position = 12
    while position + 8 <= len(data):
        chunk, size = struct.unpack_from("<4sI", data, position)
        if chunk == b"data":
            return riff_size, size
        position += 8 + size + (size & 1)
    raise AssertionError("no data chunk")
