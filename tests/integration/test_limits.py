"""Bounded input everywhere: bodies, uploads, decoded audio, names, ids and numbers (issue #14).

Each test is a finding from a hostile-client review: it failed before the fix. Sizes are counted
(bytes, samples, log lines), never times.
"""

from __future__ import annotations

import io
import json
import socket

import httpx
import numpy as np
import pytest
import soundfile as sf
from websockets.sync.client import connect

from csmserve.engine.fake import FakeEngine
from support.servers import running_server

TRANSCRIPT = "This is how I sound."


def wav_bytes(seconds: float = 1.0, rate: int = 24_000) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, (0.2 * np.sin(np.arange(int(seconds * rate)) / 10)).astype(np.float32), rate, format="WAV")
    return buffer.getvalue()


def bomb(channels: int = 8, rate: int = 96_000, seconds: int = 25) -> bytes:
    """A small FLAC whose decoded float32 audio is large: ``channels * rate * seconds`` samples of silence."""
    buffer = io.BytesIO()
    with sf.SoundFile(buffer, "w", samplerate=rate, channels=channels, format="FLAC") as out:
        block = np.zeros((rate, channels), dtype=np.float32)
        for _ in range(seconds):
            out.write(block)
    return buffer.getvalue()


def peak_rss_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def upload(server, data: bytes, name: str = "me", filename: str = "ref.flac", **extra) -> httpx.Response:
    return httpx.post(
        server.http + "/v1/voices",
        files={"audio": (filename, data, "application/octet-stream")},
        data={"name": name, "transcript": TRANSCRIPT, **extra},
        timeout=60,
    )


@pytest.fixture
def server(settings_factory):
    with running_server(settings_factory(engine="fake", max_body_bytes=4096), FakeEngine()) as running:
        yield running


def test_a_decompression_bomb_upload_is_refused_before_it_is_decoded(server):
    """A 8-channel 96 kHz FLAC (small file, ~77 MB decoded) is a 422 naming the channel count, and the
    process's peak memory grows by far less than its decoded size."""
    data = bomb()
    assert len(data) < 1_000_000
    reset_peak_rss()
    before = peak_rss_bytes()
    response = upload(server, data)
    grown = peak_rss_bytes() - before
    assert response.status_code == 422, response.text
    assert "8 channels" in response.json()["error"]["message"]
    assert grown < 30 * 1024 * 1024, f"peak RSS grew by {grown / 2**20:.0f} MiB"


def test_a_clip_above_the_rate_limit_is_refused(server):
    """A mono clip at 192 kHz is refused by its header (the rate limit), not decoded."""
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(192_000, dtype=np.float32), 192_000, format="FLAC")
    response = upload(server, buffer.getvalue())
    assert response.status_code == 422
    assert "192000 Hz" in response.json()["error"]["message"]


def test_an_unreadable_upload_names_no_heap_address(server):
    """Garbage is a 422 that says which formats are accepted, with no '0x...' address in it."""
    response = upload(server, b"\x00garbage" * 100)
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert "WAV, FLAC, MP3 or OGG" in message and "0x" not in message


def test_voice_names_are_unique(server):
    """A second voice with a taken name (any case) is a 409, and only one voice exists."""
    assert upload(server, wav_bytes(), name="Ada", filename="ref.wav").status_code == 201
    second = upload(server, wav_bytes(), name="ada", filename="ref.wav")
    assert second.status_code == 409 and second.json()["error"]["code"] == "conflict"
    assert len(httpx.get(server.http + "/v1/voices").json()["data"]) == 1


@pytest.mark.parametrize("name", ["alloy", "Nova", "3"])
def test_openai_voice_names_and_speaker_ids_are_reserved(server, name):
    """A voice may not take an OpenAI voice name or a speaker id: 409, nothing stored."""
    response = upload(server, wav_bytes(), name=name, filename="ref.wav")
    assert response.status_code == 409, response.text
    assert httpx.get(server.http + "/v1/voices").json()["data"] == []


def test_a_body_above_the_limit_is_refused_by_its_content_length(server):
    """A JSON body whose Content-Length passes max_body_bytes is a 413 before any of it is read."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 268435456\r\n\r\n")
    answer = sock.recv(65536)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_a_chunked_body_is_cut_as_soon_as_it_passes_the_limit(server):
    """A chunked body with no Content-Length is counted as it arrives: a 413 once past the limit,
    while the client has sent only a little more than the limit."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b" " * 1024
    for _ in range(6):
        sock.sendall(b"400\r\n" + chunk + b"\r\n")
    answer = sock.recv(65536)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_an_upload_above_the_limit_is_refused_by_its_content_length(settings_factory):
    """An upload whose Content-Length passes max_upload_bytes (+ form overhead) is a 413 at once."""
    with running_server(settings_factory(engine="fake", max_upload_bytes=2048), FakeEngine()) as server:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(
            b"POST /v1/voices HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 1000000000\r\n\r\n--b\r\n"
        )
        answer = sock.recv(65536)
        sock.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


@pytest.mark.parametrize(
    "path", ["/generate", "/v1/audio/speech", "/v1/text-to-speech/0", "/v1/text-to-speech/0/stream/with-timestamps"]
)
def test_a_cross_site_text_plain_post_does_not_generate(server, path):
    """A text/plain POST (what a cross-site form sends without a preflight) is a 415, no audio made."""
    body = json.dumps({"text": "Hi.", "model": "tts-1", "input": "Hi.", "voice": "alloy"})
    response = httpx.post(server.http + path, content=body, headers={"Content-Type": "text/plain"})
    assert response.status_code == 415
    assert server.engine.frames_made == {}


def test_a_post_from_another_site_is_refused(server):
    """A browser POST whose Origin is another site is a 403 (the demo page's own origin is fine)."""
    other = httpx.post(server.http + "/generate", json={"text": "Hi."}, headers={"Origin": "https://evil.example"})
    same = httpx.post(server.http + "/generate", json={"text": "Hi."}, headers={"Origin": server.http})
    assert other.status_code == 403 and other.json()["error"]["code"] == "forbidden_origin"
    assert same.status_code == 200


@pytest.mark.parametrize("temperature", [1e-39, 1e-300, 0.001])
def test_a_temperature_too_small_to_sample_with_is_refused(server, temperature):
    """Temperatures below 0.01 (at ~1e-39 the logits overflow) are an invalid_request, on REST and WebSocket."""
    rest = httpx.post(server.http + "/generate", json={"text": "Hi.", "temperature": temperature})
    assert rest.status_code == 422 and "temperature" in rest.json()["error"]["message"]
    with connect(server.ws) as ws:
        ws.send(json.dumps({"text": "Hi.", "temperature": temperature}))
        event = json.loads(ws.recv(timeout=10))
    assert event["error"]["code"] == "invalid_request"


def test_the_websocket_message_limit_counts_bytes(settings_factory):
    """A message of fewer characters than max_message_bytes but more UTF-8 bytes is message_too_large."""
    with running_server(settings_factory(engine="fake", max_message_bytes=2048, max_text_chars=4096), FakeEngine()) as server:
        with connect(server.ws) as ws:
            ws.send(json.dumps({"text": "€" * 1000}, ensure_ascii=False))  # 1,012 characters, 3,012 bytes
            event = json.loads(ws.recv(timeout=10))
    assert event["error"]["code"] == "message_too_large"
