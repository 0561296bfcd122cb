"""POST /generate, GET /audio/<id>.wav and /health over real HTTP."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
import soundfile as sf

from csmserve.audio.pcm import float_to_pcm16
from csmserve.engine import SynthesisRequest
from csmserve.engine.fake import FakeEngine
from support.audio_files import pyav_samples, soundfile_samples, wav_sizes
from support.servers import running_server

TEXT = "Hello world, this is a test."


def wav_samples(data: bytes) -> tuple[np.ndarray, int]:
    samples, rate = sf.read(io.BytesIO(data), dtype="int16")
    return samples, rate


def test_generate_returns_a_download_url_for_the_wav(fake_server):
    """POST /generate answers id, URL, duration and rate; the URL serves that audio as WAV."""
    response = httpx.post(fake_server.http + "/generate", json={"text": TEXT, "speaker_id": 2, "seed": 5})
    assert response.status_code == 200
    body = response.json()
    assert body["url"] == f"/audio/{body['id']}.wav"
    assert body["sample_rate"] == 24000
    wav = httpx.get(fake_server.http + body["url"])
    assert wav.status_code == 200
    assert wav.headers["content-type"] == "audio/wav"
    samples, rate = wav_samples(wav.content)
    expected = float_to_pcm16(
        fake_server.engine.render(SynthesisRequest(TEXT, speaker_id=2, seed=5, max_audio_ms=90_000))
    )
    assert rate == 24000
    assert np.array_equal(samples, expected)
    assert body["duration_s"] == pytest.approx(len(expected) / 24000, abs=1e-3)


@pytest.mark.parametrize("body, subtype, rate", [
    ({"format": "mulaw"}, "ULAW", 8000),
    ({"format": "alaw"}, "ALAW", 8000),
    ({"sample_rate": 16000}, "PCM_16", 16000),
])
def test_generate_writes_the_requested_encoding_and_rate(fake_server, body, subtype, rate):
    """format and sample_rate apply to REST too: a µ-law, A-law or resampled PCM WAV."""
    response = httpx.post(fake_server.http + "/generate", json={"text": TEXT, **body}, headers={"Accept": "audio/wav"})
    info = sf.info(io.BytesIO(response.content))
    assert (info.subtype, info.samplerate) == (subtype, rate)
    expected = len(fake_server.engine.render(SynthesisRequest(TEXT, max_audio_ms=90_000))) * rate / 24000
    assert abs(info.frames - expected) <= 2


@pytest.mark.parametrize("body, bytes_per_sample", [
    ({}, 2),
    ({"sample_rate": 44100}, 2),
    ({"format": "mulaw"}, 1),
    ({"format": "alaw"}, 1),
])
def test_generated_wav_is_complete_for_both_readers(fake_server, body, bytes_per_sample):
    """The downloaded WAV states its sizes; soundfile and PyAV both decode the samples /generate reports."""
    answer = httpx.post(fake_server.http + "/generate", json={"text": TEXT, **body}).json()
    data = httpx.get(fake_server.http + answer["url"]).content
    assert wav_sizes(data) == (len(data) - 8, answer["samples"] * bytes_per_sample)
    expected = (answer["samples"], answer["sample_rate"])
    assert soundfile_samples(data) == pyav_samples(data) == expected
    direct = httpx.post(
        fake_server.http + "/generate", json={"text": TEXT, **body}, headers={"Accept": "audio/wav"}
    )
    assert soundfile_samples(direct.content) == pyav_samples(direct.content) == expected


def test_accept_audio_wav_returns_the_wav_directly(fake_server):
    """A client asking for audio/wav gets the file in the response body."""
    response = httpx.post(fake_server.http + "/generate", json={"text": TEXT}, headers={"Accept": "audio/wav"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "audio/wav"
    samples, rate = wav_samples(response.content)
    assert rate == 24000 and len(samples) > 0


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"speaker_id": 0}, "text is required"),
        ({"text": ""}, "text must not be empty"),
        ({"text": "Hi", "speaker_id": 99}, "speaker_id must be an integer from 0 to 9"),
        ({"text": "Hi", "chunk_ms": 5}, "chunk_ms"),
        ({"text": 3}, "text must be a string"),
    ],
)
def test_invalid_body_is_a_422_with_a_clear_message(fake_server, body, fragment):
    """Validation errors are JSON with code invalid_request and an actionable message."""
    response = httpx.post(fake_server.http + "/generate", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert fragment in error["message"]


def test_malformed_json_is_a_400(fake_server):
    """A body that is not JSON is a 400 with a JSON error."""
    response = httpx.post(
        fake_server.http + "/generate", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"


def test_unknown_audio_id_is_a_404(fake_server):
    """A well-formed id the server never issued is a 404 JSON error."""
    response = httpx.get(fake_server.http + "/audio/AAAAAAAAAAAAAAAAAAAAAA.wav")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    "path",
    [
        "/audio/..%2F..%2F..%2Fetc%2Fpasswd",
        "/audio/..%2Fpyproject.toml",
        "/audio/%2Fetc%2Fpasswd",
        "/audio/....%2F%2Fetc%2Fpasswd.wav",
        "/audio/%2e%2e%2f%2e%2e%2fetc%2fpasswd.wav",
        "/audio/..%5C..%5Cwindows%5Cwin.ini",
        "/audio/%00.wav",
        "/audio/.wav",
    ],
)
def test_path_traversal_never_reaches_the_file_system(fake_server, path):
    """Paths that try to leave the store are 404s and return no file content."""
    response = httpx.get(fake_server.http + path)
    assert response.status_code == 404
    assert b"root:" not in response.content
    assert b"[project]" not in response.content


def test_store_keeps_existing_download_when_traversal_targets_it(fake_server):
    """An id with a path around it does not resolve to the stored file."""
    body = httpx.post(fake_server.http + "/generate", json={"text": TEXT}).json()
    assert httpx.get(f"{fake_server.http}/audio/..%2F{body['id']}.wav").status_code == 404
    assert httpx.get(fake_server.http + body["url"]).status_code == 200


def test_health_is_healthy_with_the_seed_fields_when_ready(fake_server):
    """/health carries the seed's fields, then model details."""
    fake_server.wait_ready()
    response = httpx.get(fake_server.http + "/health")
    assert response.status_code == 200
    body = response.json()
    assert {k: body[k] for k in ("status", "device", "cuda", "model_loaded", "endpoints")} == {
        "status": "healthy",
        "device": "cpu",
        "cuda": False,
        "model_loaded": True,
        "endpoints": {"websocket": "/ws/generate", "rest": "/generate"},
    }


def test_health_is_503_loading_until_the_model_is_ready(settings_factory):
    """The server listens while loading: /health is 503 "loading", then 200 "healthy"."""
    engine = FakeEngine(load_delay_s=1.5)
    with running_server(settings_factory(engine="fake"), engine) as server:
        response = httpx.get(server.http + "/health")
        assert response.status_code == 503
        assert response.json()["status"] == "loading"
        assert response.json()["model_loaded"] is False
        generate = httpx.post(server.http + "/generate", json={"text": TEXT})
        assert generate.status_code == 503
        assert generate.json()["error"]["code"] == "not_ready"
        assert "Retry-After" in generate.headers
        server.wait_ready(timeout=10)
        assert httpx.get(server.http + "/health").status_code == 200


async def test_websocket_request_while_loading_gets_not_ready(settings_factory):
    """A WebSocket request before the model is ready ends with a not_ready error frame."""
    from csmserve.client import CsmClient, ServerError

    engine = FakeEngine(load_delay_s=1.5)
    with running_server(settings_factory(engine="fake"), engine) as server:
        async with CsmClient(server.ws) as client:
            with pytest.raises(ServerError) as caught:
                await client.synthesize(TEXT)
    assert caught.value.code == "not_ready"


async def test_health_and_metrics_report_the_engines_rows_and_free_slots(settings_factory):
    """While two streams run, /health and /metrics show 2 active rows, the free slots and the last batch size."""
    import asyncio

    import websockets

    engine = FakeEngine(frame_delay_s=0.05, max_batch=4)
    with running_server(settings_factory(engine="fake"), engine) as server:
        sockets = [await websockets.connect(server.ws) for _ in range(2)]
        try:
            for ws in sockets:
                await ws.send(json.dumps({"text": "A long enough text to keep streaming for a while. " * 4}))
            for ws in sockets:
                await ws.recv()
            await asyncio.sleep(0.2)  # both rows in the batch for a few steps
            async with httpx.AsyncClient() as http:
                health = (await http.get(server.http + "/health")).json()["capacity"]
                metrics = (await http.get(server.http + "/metrics")).text
        finally:
            for ws in sockets:
                await ws.close()
    assert health["max_batch"] == 4 and health["active_rows"] == 2 and health["free_slots"] == 2
    assert health["last_batch"] == 2 and health["queue_depth"] == 0
    assert "csm_engine_rows 2.0" in metrics and "csm_engine_free_slots 2.0" in metrics
    assert "csm_engine_batch_size 2.0" in metrics
