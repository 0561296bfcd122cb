"""The OpenAI-compatible speech API, driven by the official ``openai`` package."""

from __future__ import annotations

import base64
import io
import json

import av
import httpx
import openai
import pytest

from csmserve.audio.pcm import float_to_pcm16
from csmserve.engine import SynthesisRequest

TEXT = "Hello from the OpenAI compatible endpoint."


@pytest.fixture
def client(fake_server):
    return openai.OpenAI(base_url=fake_server.http + "/v1", api_key="unused", max_retries=0)


def decoded_seconds(data: bytes) -> tuple[float, int]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return samples / stream.rate, stream.rate


def expected_seconds(engine, speaker_id=0) -> float:
    return len(engine.render(SynthesisRequest(TEXT, speaker_id=speaker_id, max_audio_ms=90_000))) / 24000


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav"])
def test_speech_returns_decodable_audio_in_each_format(client, fake_server, fmt):
    """audio.speech.create returns a file of the requested format with the utterance's duration."""
    response = client.audio.speech.create(model="tts-1", voice="alloy", input=TEXT, response_format=fmt)
    seconds, rate = decoded_seconds(response.content)
    assert rate in (24000, 48000)  # opus decodes at 48 kHz
    assert seconds == pytest.approx(expected_seconds(fake_server.engine), abs=0.15)


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
    """The endpoint runs the real CSM engine too (offline checkpoint): an mp3 of the generated length."""
    client = openai.OpenAI(base_url=csm_server.http + "/v1", api_key="unused", max_retries=0)
    response = client.audio.speech.create(model="csm-1b", voice="0", input="Hi.", response_format="mp3")
    seconds, _ = decoded_seconds(response.content)
    assert seconds > 0.2
