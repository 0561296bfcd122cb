"""Streaming container encoders for the OpenAI-compatible ``/v1/audio/speech`` response formats.

mp3, opus (in Ogg), aac (ADTS) and flac go through PyAV (FFmpeg's libmp3lame, libopus, native
aac and flac encoders, bundled in the ``av`` wheels); wav and pcm are s16le and need no codec.
All take mono float32 at 24 kHz and implement :class:`csmserve.audio.formats.AudioEncoder`:
``encode`` returns whatever the muxer has written so far, so bytes can go to the client while the
model is still speaking, and ``flush`` drains the codec and writes the trailer.

First bytes, for 80 ms input frames: mp3, opus, wav and pcm with the first frame; aac (1024-sample
frames plus look-ahead) and flac (2304-sample blocks) with the second. Everything is encoded at
24 kHz; Ogg Opus decoders play at 48 kHz, and the Opus header records 24 kHz as the input rate.

Each format comes in two forms (``make_container_encoder(fmt, whole_file=...)``):

- a **stream** (``whole_file=False``): bytes as they are encoded, never revised, so headers that need the
  length say "unknown": flac's STREAMINFO has 0 samples and no MD5, wav's sizes are 0xFFFFFFFF, mp3 has
  no Xing/LAME header. Streaming readers (FFmpeg, browsers, players) accept all of them.
- a **whole file** (``whole_file=True``): ``encode`` returns nothing and ``flush`` the complete file, its
  headers written once the length is known: flac's STREAMINFO with total samples and MD5, wav's RIFF and
  data sizes, mp3's Xing/LAME header (frame count, encoder delay and padding, so decoders trim to the
  exact length). Any reader, libsndfile's included, reads it. pcm has no header: both forms are equal.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import av
import numpy as np

from csmserve.audio.formats import SOURCE_RATE, AudioEncoder, Pcm16Encoder
from csmserve.audio.pcm import float_to_pcm16
from csmserve.audio.resample import StreamingResampler
from csmserve.audio.wav import pcm16_to_wav


@dataclass(frozen=True)
class CodecFormat:
    """One compressed response format: FFmpeg muxer and encoder names, and how to set them up."""

    container: str
    codec: str
    media_type: str
    bit_rate: int | None = None
    muxer_options: Mapping[str, str] = field(default_factory=dict)
    # What the encoder is fed: float for lossy codecs; int16 through float_to_pcm16 for flac, so
    # that it stores exactly the samples wav and pcm send (FFmpeg would scale by 32768, not 32767).
    sample_format: Literal["flt", "s16"] = "flt"


CODEC_FORMATS: Mapping[str, CodecFormat] = {
    # No ID3v2 tag: a bare MPEG audio stream, like the ones internet radio sends.
    "mp3": CodecFormat("mp3", "libmp3lame", "audio/mpeg", 64_000, {"id3v2_version": "0"}),
    # One Ogg page per 20 ms Opus packet; the muxer's default (1 s pages) would hold audio back a second.
    "opus": CodecFormat("ogg", "libopus", "audio/ogg", 32_000, {"page_duration": "20000"}),
    "aac": CodecFormat("adts", "aac", "audio/aac", 64_000),
    # The flac muxer reserves 8 KiB of padding for metadata it could only add by seeking back.
    "flac": CodecFormat("flac", "flac", "audio/flac", None, {"metadata_header_padding": "0"}, "s16"),
}

RESPONSE_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")


class _WriteOnlySink:
    """A file object PyAV can write to but not seek in.

    Without ``seek`` FFmpeg treats the output as a live stream: muxers never go back to patch
    headers (which would change bytes already sent), and the flac muxer leaves the sample count
    in STREAMINFO as 0, meaning unknown.
    """

    def __init__(self):
        self._pending = bytearray()

    def write(self, data: bytes) -> int:
        self._pending += data
        return len(data)

    def take(self) -> bytes:
        data = bytes(self._pending)
        self._pending.clear()
        return data


class _FileSink(io.BytesIO):
    """A seekable in-memory file: FFmpeg's muxers go back and complete their headers in it."""

    def take(self) -> bytes:
        return b""  # nothing leaves before the file is complete

    def whole(self) -> bytes:
        return self.getvalue()


class CodecStreamEncoder:
    """One compressed stream of ``spec``'s format, mono, muxed as it is encoded.

    ``whole_file``: mux into a seekable buffer and return the complete file from ``flush`` (headers
    with the length), instead of returning bytes as they are muxed.

    Input is float32 at 24 kHz; ``sample_rate`` (default 24 kHz) is the encoded rate, resampled as
    it streams, and ``bit_rate`` overrides the format's default bit rate.
    """

    def __init__(
        self, spec: CodecFormat, sample_rate: int = SOURCE_RATE, bit_rate: int | None = None, *, whole_file: bool = False
    ):
        self.media_type = spec.media_type
        self.sample_rate = sample_rate
        self._resampler = StreamingResampler(SOURCE_RATE, sample_rate)
        self._sink = _FileSink() if whole_file else _WriteOnlySink()
        # flush_packets: hand every muxed packet to the sink now, not when an I/O buffer fills.
        options = {**spec.muxer_options, "flush_packets": "1"}
        self._container = av.open(self._sink, mode="w", format=spec.container, container_options=options)
        self._stream = self._container.add_stream(spec.codec, rate=sample_rate, layout="mono")
        if bit_rate or spec.bit_rate:
            self._stream.bit_rate = bit_rate or spec.bit_rate
        self._sample_format = spec.sample_format
        self._samples_in = 0

    def encode(self, pcm: np.ndarray) -> bytes:
        samples = np.ascontiguousarray(pcm, dtype=np.float32)
        if samples.ndim != 1:
            raise ValueError(f"expected mono samples of shape (n,), got shape {samples.shape}")
        self._encode(self._resampler.process(samples))
        return self._sink.take()

    def _encode(self, samples: np.ndarray) -> None:
        if samples.size:
            if self._sample_format == "s16":
                samples = float_to_pcm16(samples)
            frame = av.AudioFrame.from_ndarray(samples[np.newaxis, :], self._sample_format, "mono")
            frame.sample_rate = self.sample_rate
            frame.pts = self._samples_in
            self._samples_in += samples.size
            # PyAV converts the sample format and re-cuts frames to the codec's frame size itself.
            self._container.mux(self._stream.encode(frame))

    def flush(self) -> bytes:
        """Drain the encoder, write the trailer, close the container; the encoder is spent afterwards."""
        self._encode(self._resampler.flush())
        self._container.mux(self._stream.encode(None))
        self._container.close()
        return self._sink.whole() if isinstance(self._sink, _FileSink) else self._sink.take()


WAV_HEADER_BYTES = 44
_UNKNOWN_SIZE = 0xFFFFFFFF


def streaming_wav_header(sample_rate: int, channels: int = 1, bits_per_sample: int = 16) -> bytes:
    """A 44-byte canonical RIFF/WAVE header for PCM whose length is not known yet.

    The RIFF and data chunk sizes are 0xFFFFFFFF, as OpenAI's streamed wav has them; FFmpeg (PyAV)
    and libsndfile (soundfile) read such a file to its end. (soundfile and PyAV write a header only
    once the length is known, which a stream cannot wait for.)
    """
    block_align = channels * bits_per_sample // 8
    byte_rate = sample_rate * block_align
    riff = struct.pack("<4sI4s", b"RIFF", _UNKNOWN_SIZE, b"WAVE")
    # fmt chunk: 16 bytes, format 1 (integer PCM).
    fmt = struct.pack(
        "<4sIHHIIHH", b"fmt ", 16, 1, channels, sample_rate, byte_rate, block_align, bits_per_sample
    )
    data = struct.pack("<4sI", b"data", _UNKNOWN_SIZE)
    return riff + fmt + data


class WavStreamEncoder:
    """A streamed 16-bit PCM WAV at 24 kHz: :func:`streaming_wav_header`, then s16le samples.

    The header comes with the first bytes returned, by ``encode`` or, for a stream with no audio,
    by ``flush``.
    """

    media_type = "audio/wav"
    sample_rate = SOURCE_RATE

    def __init__(self):
        self._pcm = Pcm16Encoder(SOURCE_RATE)
        self._header: bytes = streaming_wav_header(SOURCE_RATE)

    def _with_header(self, data: bytes) -> bytes:
        header, self._header = self._header, b""
        return header + data

    def encode(self, pcm: np.ndarray) -> bytes:
        return self._with_header(self._pcm.encode(pcm))

    def flush(self) -> bytes:
        return self._with_header(self._pcm.flush())


class WavFileEncoder:
    """A complete 16-bit PCM WAV at 24 kHz, with its RIFF and data sizes: everything comes from ``flush``."""

    media_type = "audio/wav"
    sample_rate = SOURCE_RATE

    def __init__(self):
        self._pcm = Pcm16Encoder(SOURCE_RATE)
        self._samples = bytearray()

    def encode(self, pcm: np.ndarray) -> bytes:
        self._samples += self._pcm.encode(pcm)
        return b""

    def flush(self) -> bytes:
        self._samples += self._pcm.flush()
        return pcm16_to_wav(bytes(self._samples), SOURCE_RATE)


def make_container_encoder(response_format: str, *, whole_file: bool = False) -> AudioEncoder:
    """The encoder for an OpenAI ``response_format``: a stream, or with ``whole_file`` a complete file
    (see the module docstring). ValueError names the valid formats."""
    if response_format in CODEC_FORMATS:
        return CodecStreamEncoder(CODEC_FORMATS[response_format], whole_file=whole_file)
    if response_format == "wav":
        return WavFileEncoder() if whole_file else WavStreamEncoder()
    if response_format == "pcm":
        return Pcm16Encoder(SOURCE_RATE)  # raw s16le at 24 kHz, media type audio/pcm
    raise ValueError(f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, got {response_format!r}")
