"""G.711 µ-law and A-law: bit-exact with CPython's audioop over every int16 value and every code."""

from __future__ import annotations

import audioop  # stdlib up to 3.12; the audioop-lts dev dependency provides it from 3.13 on

import numpy as np
import pytest

from csmserve.audio.g711 import (
    ALAW_SILENCE,
    ULAW_SILENCE,
    decode_alaw,
    decode_ulaw,
    encode_alaw,
    encode_ulaw,
)

EVERY_SAMPLE = np.arange(-32768, 32768, dtype=np.int16)
EVERY_CODE = np.arange(256, dtype=np.uint8)


def _s16le(samples: np.ndarray) -> bytes:
    return samples.astype("<i2").tobytes()


def test_ulaw_encoding_matches_audioop_for_all_int16():
    """encode_ulaw equals audioop.lin2ulaw on all 65536 samples."""
    assert encode_ulaw(EVERY_SAMPLE).tobytes() == audioop.lin2ulaw(_s16le(EVERY_SAMPLE), 2)


def test_alaw_encoding_matches_audioop_for_all_int16():
    """encode_alaw equals audioop.lin2alaw on all 65536 samples."""
    assert encode_alaw(EVERY_SAMPLE).tobytes() == audioop.lin2alaw(_s16le(EVERY_SAMPLE), 2)


def test_ulaw_decoding_matches_audioop_for_all_codes():
    """decode_ulaw equals audioop.ulaw2lin on all 256 codes, from an array or from bytes."""
    expected = audioop.ulaw2lin(EVERY_CODE.tobytes(), 2)
    assert _s16le(decode_ulaw(EVERY_CODE)) == expected
    assert _s16le(decode_ulaw(EVERY_CODE.tobytes())) == expected


def test_alaw_decoding_matches_audioop_for_all_codes():
    """decode_alaw equals audioop.alaw2lin on all 256 codes, from an array or from bytes."""
    expected = audioop.alaw2lin(EVERY_CODE.tobytes(), 2)
    assert _s16le(decode_alaw(EVERY_CODE)) == expected
    assert _s16le(decode_alaw(EVERY_CODE.tobytes())) == expected


def test_decoded_values_encode_back_to_their_codes():
    """Every code survives decode -> encode, except µ-law's negative zero (0x7F), which becomes 0xFF."""
    ulaw_back = encode_ulaw(decode_ulaw(EVERY_CODE))
    assert ulaw_back[0x7F] == ULAW_SILENCE
    assert np.array_equal(np.delete(ulaw_back, 0x7F), np.delete(EVERY_CODE, 0x7F))
    assert np.array_equal(encode_alaw(decode_alaw(EVERY_CODE)), EVERY_CODE)


@pytest.mark.parametrize(("encode", "decode"), [(encode_ulaw, decode_ulaw), (encode_alaw, decode_alaw)])
def test_round_trip_keeps_telephone_quality(encode, decode):
    """A half-scale 440 Hz tone comes back from encode -> decode with at least 35 dB SNR (G.711 gives ~38)."""
    t = np.arange(8000) / 8000
    tone = np.round(16000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    error = decode(encode(tone)).astype(np.float64) - tone
    snr_db = 10 * np.log10(np.sum(tone.astype(np.float64) ** 2) / np.sum(error**2))
    assert snr_db >= 35


def test_silence_codes():
    """Zero encodes as 0xFF in µ-law and 0xD5 in A-law, the codes padding must use."""
    zero = np.zeros(3, dtype=np.int16)
    assert encode_ulaw(zero).tolist() == [ULAW_SILENCE] * 3 == [0xFF] * 3
    assert encode_alaw(zero).tolist() == [ALAW_SILENCE] * 3 == [0xD5] * 3


def test_encoders_keep_shape_and_return_bytes_per_sample():
    """One uint8 code per int16 sample, same shape."""
    block = np.zeros((4, 160), dtype=np.int16)
    assert encode_ulaw(block).shape == (4, 160)
    assert encode_alaw(block).dtype == np.uint8


def test_float_input_is_refused():
    """Floats must go through float_to_pcm16 first; silently truncating them would be a bug."""
    with pytest.raises(TypeError, match="int16"):
        encode_ulaw(np.zeros(10, dtype=np.float32))
