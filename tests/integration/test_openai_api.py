"""The OpenAI-compatible speech API, driven by the official ``openai`` package."""

from __future__ import annotations

import base64
import hashlib
import io
import json

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf

from csmserve.audio.pcm import float_to_pcm16
from csmserve.engine import SynthesisRequest
from support.audio_files import adts_samples, flac_streaminfo, pyav_samples, soundfile_samples, wav_sizes

TEXT = "Hello from the OpenAI compatible endpoint."


@pytest.fixture
def client(fake_server):
    return openai.OpenAI(base_url=fake_server.http + "/v1", api_key="unused", max_retries=0)


def expected_seconds(engine, speaker_id=0) -> float:
    return len(engine.render(SynthesisRequest(TEXT, speaker_id=speaker_id, max_audio_ms=90_000))) / 24000


# Samples a decoder may give beyond the audio generated (see tests/unit/test_containers.py): a whole
# file states its length; a stream cannot (mp3 then keeps its ~1100-sample encoder delay, aac its priming).
WHOLE_EXTRA = {"wav": 0, "flac": 0, "opus": 0, "mp3": 576, "aac": 2047}
STREAM_EXTRA = {"wav": 0, "flac": 0, "opus": 0, "mp3": 2400, "aac": 2047}


def generated(engine, speaker_id=0) -> np.ndarray:
    return engine.render(SynthesisRequest(TEXT, speaker_id=speaker_id, max_audio_ms=90_000))


def assert_length(samples_and_rate: tuple[int, int], expected: int, extra: int) -> None:
    samples, rate = samples_and_rate
    at_24k = samples * 24000 // rate  # Ogg Opus decodes at 48 kHz in FFmpeg
    assert expected <= at_24k <= expected + extra, (samples, rate, expected)


@pytest.mark.parametrize("fmt", sorted(WHOLE_EXTRA))
def test_speech_create_returns_a_complete_file_both_readers_decode(client, fake_server, fmt):
    """audio.speech.create gets a whole file with Content-Length; soundfile (ADTS headers for aac) and PyAV
    both decode it to the number of samples generated."""
    response = client.audio.speech.create(model="tts-1", voice="alloy", input=TEXT, response_format=fmt)
    data = response.content
    assert int(response.response.headers["content-length"]) == len(data)
    expected = len(generated(fake_server.engine))
    assert_length(adts_samples(data) if fmt == "aac" else soundfile_samples(data), expected, WHOLE_EXTRA[fmt])
    assert_length(pyav_samples(data), expected, WHOLE_EXTRA[fmt])


def test_speech_create_flac_states_its_samples_and_md5(client, fake_server):
    """The flac the openai client gets has STREAMINFO's total samples and MD5 (libsndfile needs the count)."""
    response = client.audio.speech.create(model="tts-1", voice="alloy", input=TEXT, response_format="flac")
    data = response.content
    pcm = float_to_pcm16(generated(fake_server.engine))
    assert flac_streaminfo(data) == (24000, len(pcm), hashlib.md5(pcm.astype("<i2").tobytes()).digest())


def test_speech_create_wav_states_its_sizes(client, fake_server):
    """The wav the openai client gets has its real RIFF and data sizes, not the streaming 0xFFFFFFFF."""
    data = client.audio.speech.create(model="tts-1", voice="alloy", input=TEXT, response_format="wav").content
    assert wav_sizes(data) == (len(data) - 8, 2 * len(generated(fake_server.engine)))


@pytest.mark.parametrize("fmt", sorted(STREAM_EXTRA))
def test_streaming_response_in_each_format_is_read_by_streaming_readers(client, fake_server, fmt):
    """with_streaming_response gets a chunked stream; PyAV (and libsndfile: wav, mp3, opus) reads it whole."""
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input=TEXT, response_format=fmt
    ) as response:
        assert "content-length" not in response.headers
        assert response.headers["transfer-encoding"] == "chunked"
        data = b"".join(response.iter_bytes())
    expected = len(generated(fake_server.engine))
    assert_length(pyav_samples(data), expected, STREAM_EXTRA[fmt])
    if fmt in ("wav", "mp3", "opus"):
        assert_length(soundfile_samples(data), expected, STREAM_EXTRA[fmt])


@pytest.mark.parametrize(("stream", "headers", "whole"), [
    (True, {}, False),
    (False, {"X-Stainless-Raw-Response": "stream"}, True),
    (None, {}, True),
])
def test_stream_field_chooses_a_stream_or_a_whole_file(fake_server, stream, headers, whole):
    """The body's "stream": true streams (chunked); false gives a whole file even to the SDK's
    streaming reader; unset (no SDK header), a whole file."""
    body = {"model": "tts-1", "voice": "alloy", "input": TEXT, "response_format": "flac"}
    if stream is not None:
        body["stream"] = stream
    response = httpx.post(fake_server.http + "/v1/audio/speech", json=body, headers=headers)
    assert response.status_code == 200
    assert ("content-length" in response.headers) is whole
    assert flac_streaminfo(response.content)[1] == (len(generated(fake_server.engine)) if whole else 0)


def test_pcm_format_is_the_raw_24khz_audio(client, fake_server):
    """response_format=pcm is s16le at 24 kHz, sample for sample the engine's audio."""
    response = client.audio.speech.create(model="csm-1b", voice="2", input=TEXT, response_format="pcm")
    audio = fake_server.engine.render(SynthesisRequest(TEXT, speaker_id=2, max_audio_ms=90_000))
    assert response.content == float_to_pcm16(audio).tobytes()


def test_streaming_response_delivers_the_audio_in_pieces(client, fake_server):
    """with_streaming_response streams bytes as they are generated."""
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="nova", input=TEXT, response_format="pcm"
    ) as response:
        assert response.headers["content-type"].startswith("audio/pcm")
        pieces = list(response.iter_bytes(chunk_size=None))
    speaker = 6  # nova
    audio = fake_server.engine.render(SynthesisRequest(TEXT, speaker_id=speaker, max_audio_ms=90_000))
    assert b"".join(pieces) == float_to_pcm16(audio).tobytes()


def test_sse_stream_format_sends_audio_deltas_then_done(fake_server):
    """stream_format=sse: speech.audio.delta events with base64 audio, then speech.audio.done."""
    body = {"model": "tts-1", "voice": "alloy", "input": TEXT, "response_format": "pcm", "stream_format": "sse"}
    with httpx.stream("POST", fake_server.http + "/v1/audio/speech", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert {e["type"] for e in events[:-1]} == {"speech.audio.delta"}
    assert events[-1]["type"] == "speech.audio.done"
    pcm = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert len(pcm) == 2 * round(expected_seconds(fake_server.engine) * 24000)


def test_openai_voice_names_map_to_speaker_ids(client, fake_server):
    """OpenAI voice names are aliases of speaker ids; a digit is a speaker id."""
    by_name = client.audio.speech.create(model="tts-1", voice="echo", input=TEXT, response_format="pcm").content
    by_id = client.audio.speech.create(model="tts-1", voice="4", input=TEXT, response_format="pcm").content
    assert by_name == by_id


def test_registered_voice_can_be_named(client, fake_server):
    """A voice registered through /v1/voices is accepted by name."""
    from test_voices_and_context import clip, register

    register(fake_server.http, clip("WAV"), name="host", speaker_id=5)
    by_voice = client.audio.speech.create(model="tts-1", voice="host", input=TEXT, response_format="pcm").content
    audio = fake_server.engine.render(SynthesisRequest(TEXT, speaker_id=5, max_audio_ms=90_000))
    assert by_voice == float_to_pcm16(audio).tobytes()


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"speed": 1.5}, "speed other than 1.0 is not supported"),
        ({"voice": "nobody"}, "unknown voice 'nobody'"),
        ({"model": "whisper-1"}, "model must be one of"),
        ({"response_format": "ogg"}, "response_format must be one of"),
        ({"input": ""}, "input must be a non-empty string"),
        ({"extra_body": {"stream": "yes"}}, "stream must be true or false"),
    ],
)
def test_bad_requests_are_400s_the_client_reports(client, kwargs, fragment):
    """Invalid parameters raise openai.BadRequestError with our message."""
    args = {"model": "tts-1", "voice": "alloy", "input": TEXT, **kwargs}
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.speech.create(**args)
    assert fragment in str(caught.value)


def test_models_are_listed(client):
    """GET /v1/models lists csm-1b and the OpenAI TTS model names it answers to."""
    ids = {m.id for m in client.models.list()}
    assert {"csm-1b", "tts-1", "tts-1-hd"} <= ids


def test_speech_with_the_offline_csm(csm_server):
    """The real CSM engine (offline checkpoint): with a seed, a whole flac holds exactly the pcm response's
    samples, and both readers decode it to that length."""
    client = openai.OpenAI(base_url=csm_server.http + "/v1", api_key="unused", max_retries=0)
    args = {"model": "csm-1b", "voice": "0", "input": "Hi there.", "extra_body": {"seed": 7}}
    pcm = np.frombuffer(client.audio.speech.create(response_format="pcm", **args).content, dtype="<i2")
    flac = client.audio.speech.create(response_format="flac", **args).content
    assert pcm.size >= 1920 and pcm.size % 1920 == 0  # whole 80 ms frames
    assert flac_streaminfo(flac)[:2] == (24000, pcm.size)
    assert soundfile_samples(flac) == pyav_samples(flac) == (pcm.size, 24000)
    np.testing.assert_array_equal(sf.read(io.BytesIO(flac), dtype="int16")[0], pcm)
