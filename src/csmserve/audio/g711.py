"""G.711 µ-law and A-law, vectorised: int16 PCM to one byte per sample and back.

The segment/quantisation arithmetic is the classic Sun Microsystems ``g711.c`` (public domain),
the one CPython's ``audioop`` uses, and the encoders match ``audioop.lin2ulaw``/``lin2alaw``
bit for bit over all 65536 int16 inputs. As there, µ-law works on the top 14 bits of each sample
and A-law on the top 13 bits (an arithmetic shift, rounding towards minus infinity).
Silence encodes as 0xFF in µ-law and 0xD5 in A-law.
"""

from __future__ import annotations

import numpy as np

ULAW_SILENCE = 0xFF
ALAW_SILENCE = 0xD5

# Upper magnitude of each of the 8 segments (chords), in the 14-bit (µ-law) and 13-bit (A-law) domains.
_ULAW_SEGMENT_ENDS = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], dtype=np.int32)
_ALAW_SEGMENT_ENDS = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF], dtype=np.int32)
_ULAW_BIAS = 0x84
_ULAW_CLIP = 8159  # largest 14-bit magnitude before the bias; larger ones saturate


def _as_pcm16(pcm: np.ndarray) -> np.ndarray:
    samples = np.asarray(pcm)
    if samples.dtype != np.int16:
        raise TypeError(f"G.711 encodes int16 samples, got {samples.dtype}")
    return samples.astype(np.int32)


def _as_codes(codes: np.ndarray | bytes) -> np.ndarray:
    if isinstance(codes, (bytes, bytearray, memoryview)):
        return np.frombuffer(codes, dtype=np.uint8).astype(np.int32)
    return np.asarray(codes, dtype=np.uint8).astype(np.int32)


def encode_ulaw(pcm: np.ndarray) -> np.ndarray:
    """int16 samples, any shape, to µ-law codes (uint8, same shape)."""
    value = _as_pcm16(pcm) >> 2
    mask = np.where(value < 0, 0x7F, 0xFF)
    magnitude = np.minimum(np.abs(value), _ULAW_CLIP) + (_ULAW_BIAS >> 2)
    segment = np.searchsorted(_ULAW_SEGMENT_ENDS, magnitude, side="left")
    mantissa = (magnitude >> (np.minimum(segment, 7) + 1)) & 0x0F
    code = np.where(segment >= 8, 0x7F, (segment << 4) | mantissa)
    return (code ^ mask).astype(np.uint8)


def decode_ulaw(codes: np.ndarray | bytes) -> np.ndarray:
    """µ-law codes (uint8 array or bytes) to int16 samples, the values audioop.ulaw2lin gives."""
    inverted = ~_as_codes(codes) & 0xFF
    magnitude = (((inverted & 0x0F) << 3) + _ULAW_BIAS) << ((inverted & 0x70) >> 4)
    return np.where(inverted & 0x80, _ULAW_BIAS - magnitude, magnitude - _ULAW_BIAS).astype(np.int16)


def encode_alaw(pcm: np.ndarray) -> np.ndarray:
    """int16 samples, any shape, to A-law codes (uint8, same shape)."""
    value = _as_pcm16(pcm) >> 3
    negative = value < 0
    mask = np.where(negative, 0x55, 0xD5)
    # One's complement for negatives: -1 and 0 land in the same first step, as G.711 wants.
    magnitude = np.where(negative, -value - 1, value)
    segment = np.searchsorted(_ALAW_SEGMENT_ENDS, magnitude, side="left")  # at most 7 for 13-bit input
    mantissa = (magnitude >> np.maximum(segment, 1)) & 0x0F
    return (((segment << 4) | mantissa) ^ mask).astype(np.uint8)


def decode_alaw(codes: np.ndarray | bytes) -> np.ndarray:
    """A-law codes (uint8 array or bytes) to int16 samples, the values audioop.alaw2lin gives."""
    toggled = _as_codes(codes) ^ 0x55
    segment = (toggled & 0x70) >> 4
    step = (toggled & 0x0F) << 4
    magnitude = np.where(segment == 0, step + 8, (step + 0x108) << np.maximum(segment - 1, 0))
    return np.where(toggled & 0x80, magnitude, -magnitude).astype(np.int16)
