"""Pacing by what the client has played (issue #18): a streaming route generates at most ``max_lead_s``
of audio beyond what its client has taken off the socket, whatever the kernel's buffers would hold, and
a client that takes nothing for ``max_lag_s`` is cut. Run on every streamed route, with the fewest
bytes per second each offers (mu-law: a whole 90 s request fits in the sockets' buffers), and on the
Wyoming port (raw TCP)."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from websockets.sync.client import connect

from csmserve.config import Settings
from csmserve.engine.fake import FakeEngine
from support.routes import STREAMING_ROUTES, counter
from support.servers import running_server

NON_READERS = 8
LEAD_S, LAG_S = 1.0, 2.0
FRAME_S = 0.08
#: ~9,000 frames (12 minutes) from the fake engine: far more than any buffer holds.
LONG_TEXT = "This sentence keeps the engine busy for a long while. " * 700
#: What may sit beyond the lead: one chunk being sent, the engine's 8 buffered frames, and the
#: client's 8 KiB receive buffer (a second of mu-law; ~2 s of Opus), which the server cannot see.
SLACK_S = 4.0
PACED = [route.smallest() for route in STREAMING_ROUTES if route.streams] + [
    route for route in STREAMING_ROUTES if route.streams and route.endpoint == "ws"
]


def paced_settings(tmp_path, **overrides) -> Settings:
    values = dict(
        engine="fake", host="127.0.0.1", port=0, audio_dir=tmp_path / "audio", voices_dir=tmp_path / "voices",
        max_text_chars=40_000, max_audio_ms=900_000, max_lead_s=LEAD_S, max_lag_s=LAG_S,
    )
    values.update(overrides)
    return Settings(**values)


def frames_once_still(engine: FakeEngine, ids: list[str]) -> dict[str, int]:
    """The frames made for ``ids`` once no count has moved for 20 polls in a row (each has begun)."""
    last, still = None, 0
    for _ in range(2000):
        now = {i: engine.frames_made.get(i, 0) for i in ids}
        still = still + 1 if now == last and all(now.values()) else 0
        if still >= 20:
            return now
        last = now
        time.sleep(0.01)
    raise AssertionError(f"the non-readers' frames never settled: {last}")


def honest_first_audio(server, engine: FakeEngine) -> tuple[bytes, list[int]]:
    """A reading WebSocket client asks for 160 ms: its audio, and the batch sizes of the steps made
    between its request and its last frame."""
    with connect(server.ws, open_timeout=10) as ws:
        before = len(engine.batch_sizes)
        ws.send(json.dumps({"text": "Short.", "max_audio_ms": 160, "request_id": "honest"}))
        audio = b""
        while isinstance(message := ws.recv(timeout=10), bytes):
            audio += message
        steps = engine.batch_sizes[before:]
    assert "error" not in json.loads(message), message
    return audio, steps


@pytest.mark.parametrize("route", PACED, ids=lambda r: r.name)
def test_clients_that_read_nothing_get_only_the_lead_and_are_cut_after_the_lag(tmp_path, route):
    """Eight clients that never read get at most max_lead_s (plus what the buffers they own hold) of
    audio made for them, then sit out the engine's steps: an honest client's request runs in steps of
    its own row alone. max_lag_s after they stopped taking audio, all eight are cut."""
    engine = FakeEngine(max_lag_s=600)  # the engine's own drop stays out of the way: the server paces
    with running_server(paced_settings(tmp_path), engine) as server:
        ids = [f"idle-{i}" for i in range(NON_READERS)]
        socks = [route.open(server.port, LONG_TEXT, rid) for rid in ids]
        try:
            made = frames_once_still(engine, ids)
            audio, steps = honest_first_audio(server, engine)
            for _ in range(1000):
                metrics = httpx.get(server.http + "/metrics", timeout=10).text
                if counter(metrics, "csm_slow_clients_total") >= NON_READERS:
                    break
                time.sleep(0.02)
        finally:
            for sock in socks:
                sock.close()
    assert max(made.values()) <= (LEAD_S + SLACK_S) / FRAME_S, made
    assert len(audio) == 2 * 24_000 * 160 // 1000 and steps and set(steps) == {1}, steps
    assert counter(metrics, "csm_slow_clients_total") == NON_READERS
    assert counter(metrics, "csm_requests_total", endpoint=route.endpoint, outcome="disconnected") >= NON_READERS


def test_clients_that_read_as_audio_comes_are_never_held(tmp_path):
    """With a lead of 0.2 s and a lag of 0.3 s, clients that read at once get an 18 s request whole,
    on the WebSocket and on a streamed HTTP response, and nobody is counted as slow."""
    text = "A client that reads every byte as it comes. " * 20
    with running_server(paced_settings(tmp_path, max_lead_s=0.2, max_lag_s=0.3), FakeEngine()) as server:
        with connect(server.ws, open_timeout=10) as ws:
            ws.send(json.dumps({"text": text, "max_audio_ms": 30_000}))
            audio = b""
            while isinstance(message := ws.recv(timeout=10), bytes):
                audio += message
        body = {"model": "tts-1", "input": text, "voice": "alloy", "response_format": "pcm", "stream": True}
        with httpx.stream("POST", server.http + "/v1/audio/speech", json=body, timeout=30) as response:
            streamed = b"".join(response.iter_bytes())
        metrics = httpx.get(server.http + "/metrics", timeout=10).text
    done = json.loads(message)
    assert "error" not in done and len(audio) == 2 * done["samples"] and done["audio_ms"] > 15_000
    assert len(streamed) == len(audio)
    assert counter(metrics, "csm_slow_clients_total") == 0


def test_a_wyoming_client_that_reads_nothing_gets_only_the_lead_and_is_cut(tmp_path):
    """Wyoming (raw TCP, not HTTP) is paced the same way: a client that sends a long synthesize and
    reads nothing gets at most max_lead_s (plus what its buffers hold) made for it, and is cut
    max_lag_s after it stopped taking audio, counted as slow and disconnected."""
    engine = FakeEngine(max_lag_s=600)
    with running_server(paced_settings(tmp_path, wyoming_port=0), engine) as server:
        server.wait_ready()
        port = server.app.state.wyoming.port
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        try:
            sock.sendall(json.dumps({"type": "synthesize", "data": {"text": LONG_TEXT}}).encode() + b"\n")
            for _ in range(1000):
                if engine.frames_made:
                    break
                time.sleep(0.01)
            made = frames_once_still(engine, list(engine.frames_made))
            for _ in range(1000):
                metrics = httpx.get(server.http + "/metrics", timeout=10).text
                if counter(metrics, "csm_requests_total", endpoint="wyoming", outcome="disconnected") >= 1:
                    break
                time.sleep(0.02)
        finally:
            sock.close()
    assert max(made.values()) <= (LEAD_S + SLACK_S) / FRAME_S, made
    assert counter(metrics, "csm_slow_clients_total") == 1
    assert counter(metrics, "csm_requests_total", endpoint="wyoming", outcome="disconnected") == 1
