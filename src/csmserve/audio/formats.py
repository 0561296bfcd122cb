"""Raw output encodings of the streaming protocol: s16le PCM at six rates, and G.711 at 8 kHz.

Every encoder here and in :mod:`csmserve.audio.containers` has the same small interface,
:class:`AudioEncoder`: float32 PCM at 24 kHz in, bytes ready for the wire out. Each instance
carries the state of one stream (resampler filter, partial frames), so use one per utterance.
"""

from __future__ import annotations

from typing import Literal, Protocol

import numpy as np

from csmserve.audio.g711 import encode_alaw, encode_ulaw
from csmserve.audio.pcm import float_to_pcm16
from csmserve.audio.resample import StreamingResampler

SOURCE_RATE = 24_000  # what the model produces (Mimi decodes at 24 kHz)
PCM_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
G711_RATE = 8000
FORMATS = ("pcm_s16le", "mulaw", "alaw")


class AudioEncoder(Protocol):
    """One output stream: mono float32 samples in [-1, 1] at 24 kHz in, encoded bytes out.

    ``encode`` may return b"" while a codec or resampler fills up; ``flush`` ends the stream and
    returns everything still held back (and any trailer). Bytes are returned in stream order and
    their concatenation is the whole encoded stream. ``media_type`` is the MIME type to announce;
    ``sample_rate`` is the rate of the encoded audio in Hz.
    """

    media_type: str
    sample_rate: int

    def encode(self, pcm: np.ndarray) -> bytes: ...

    def flush(self) -> bytes: ...


class Pcm16Encoder:
    """Signed 16-bit little-endian mono PCM at ``sample_rate`` Hz, resampled from 24 kHz as it streams.

    Samples outside [-1, 1] (the resampler can overshoot on loud input) clip; they never wrap.
    """

    media_type = "audio/pcm"

    def __init__(self, sample_rate: int = SOURCE_RATE):
        self.sample_rate = sample_rate
        self._resampler = StreamingResampler(SOURCE_RATE, sample_rate)

    def encode_samples(self, pcm: np.ndarray) -> np.ndarray:
        """float32 (n,) at 24 kHz to int16 (m,) at ``sample_rate``."""
        return float_to_pcm16(self._resampler.process(pcm))

    def flush_samples(self) -> np.ndarray:
        """The int16 tail still in the resampler at the end of the stream."""
        return float_to_pcm16(self._resampler.flush())

    def encode(self, pcm: np.ndarray) -> bytes:
        return self.encode_samples(pcm).tobytes()

    def flush(self) -> bytes:
        return self.flush_samples().tobytes()


class G711Encoder:
    """One G.711 byte per sample at 8 kHz: 24 kHz float32 -> 8 kHz int16 -> µ-law or A-law."""

    sample_rate = G711_RATE

    def __init__(self, law: Literal["mulaw", "alaw"]):
        self.media_type, self._compand = _G711_LAWS[law]
        self._pcm = Pcm16Encoder(G711_RATE)

    def encode(self, pcm: np.ndarray) -> bytes:
        return self._compand(self._pcm.encode_samples(pcm)).tobytes()

    def flush(self) -> bytes:
        return self._compand(self._pcm.flush_samples()).tobytes()


# Media types from RFC 4856 (PCMU is also what Twilio and Telnyx media streams carry).
_G711_LAWS = {"mulaw": ("audio/PCMU", encode_ulaw), "alaw": ("audio/PCMA", encode_alaw)}


def make_encoder(format: str, sample_rate: int) -> AudioEncoder:
    """The streaming encoder for a protocol ``format`` at ``sample_rate`` Hz.

    Raises ValueError, with a message a client can act on, for an unknown format, a rate outside
    :data:`PCM_RATES`, or G.711 at any rate but 8000 Hz.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if sample_rate not in PCM_RATES:
        raise ValueError(f"sample_rate must be one of {', '.join(map(str, PCM_RATES))}, got {sample_rate}")
    if format == "pcm_s16le":
        return Pcm16Encoder(sample_rate)
    if sample_rate != G711_RATE:
        raise ValueError(f"{format} is only available at {G711_RATE} Hz")
    return G711Encoder(format)
