"""Admission, limits, failures and metrics: the server survives real traffic."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest
import torch
import websockets
from websockets.exceptions import ConnectionClosed

from csmserve.client import CsmClient, ServerError
from csmserve.engine import SynthesisRequest
from csmserve.engine.fake import FakeEngine
from support.servers import running_server

LONG = "This sentence is long enough to take a while to speak. " * 6


async def close_code(ws) -> int:
    """Read until the server closes; the close code."""
    with pytest.raises(ConnectionClosed) as caught:
        while True:
            await asyncio.wait_for(ws.recv(), 10)
    return caught.value.rcvd.code


async def test_beyond_max_streams_a_websocket_request_gets_1013(settings_factory):
    """With every stream slot taken, a new request gets an overloaded error frame and close 1013."""
    engine = FakeEngine(frame_delay_s=0.05)
    with running_server(settings_factory(engine="fake", max_streams=1), engine) as server:
        async with websockets.connect(server.ws) as busy, websockets.connect(server.ws) as late:
            await busy.send(json.dumps({"text": LONG}))
            assert isinstance(await busy.recv(), bytes)
            await late.send(json.dumps({"text": "Me too.", "request_id": "late"}))
            event = json.loads(await late.recv())
            assert event["error"]["code"] == "overloaded" and event["request_id"] == "late"
            assert await close_code(late) == 1013


def test_beyond_max_streams_rest_gets_429_with_retry_after(settings_factory):
    """REST requests beyond capacity are 429 with Retry-After."""
    engine = FakeEngine(frame_delay_s=0.05)
    with running_server(settings_factory(engine="fake", max_streams=1), engine) as server:

        async def scenario():
            async with websockets.connect(server.ws) as busy, httpx.AsyncClient() as http:
                await busy.send(json.dumps({"text": LONG}))
                await busy.recv()
                return await http.post(server.http + "/generate", json={"text": "Hi."})

        response = asyncio.run(scenario())
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "1"
    assert response.json()["error"]["code"] == "overloaded"


async def test_worker_queue_overflow_is_refused(settings_factory):
    """Requests beyond the engine's rows and its queue bound are refused with 1013, not queued without end."""
    engine = FakeEngine(frame_delay_s=0.05, max_queue=1, max_batch=1)
    with running_server(settings_factory(engine="fake", max_streams=10), engine) as server:
        a, b, c = [await websockets.connect(server.ws) for _ in range(3)]
        try:
            await a.send(json.dumps({"text": LONG}))
            await a.recv()  # in the engine's only row
            await b.send(json.dumps({"text": LONG}))  # waits in the queue
            await asyncio.sleep(0.2)
            await c.send(json.dumps({"text": LONG, "request_id": "c"}))
            event = json.loads(await c.recv())
            assert event["error"]["code"] == "overloaded"
            assert await close_code(c) == 1013
        finally:
            for ws in (a, b, c):
                await ws.close()


async def test_request_past_its_deadline_is_stopped(settings_factory):
    """A request still generating at request_timeout_s ends with deadline_exceeded; the connection stays usable."""
    engine = FakeEngine(frame_delay_s=0.05)
    with running_server(settings_factory(engine="fake", request_timeout_s=0.4), engine) as server:
        async with CsmClient(server.ws) as client:
            with pytest.raises(ServerError) as caught:
                await client.synthesize(LONG, request_id="slow")
            assert caught.value.code == "deadline_exceeded"
            made = engine.frames_made["slow"]
            await asyncio.sleep(0.3)
            assert engine.frames_made["slow"] <= made + 1
            engine.frame_delay_s = 0
            assert (await client.synthesize("Quick one.")).pcm


async def test_client_that_stops_reading_is_closed_and_its_generation_cancelled(settings_factory):
    """A reader that falls behind by max_lag_s is closed; generation stops, so memory stays bounded."""
    engine = FakeEngine()
    settings = settings_factory(engine="fake", max_lag_s=0.5, max_audio_ms=90_000, max_text_chars=4096)
    with running_server(settings, engine) as server:
        # A client with small buffers that stops reading (its library stops too: max_queue=1).
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        ws = await websockets.connect(server.ws, sock=sock, max_queue=1)
        await ws.send(json.dumps({"text": LONG * 10, "request_id": "stalled", "max_audio_ms": 90_000}))
        await asyncio.sleep(2.0)
        total = engine.num_frames(SynthesisRequest(LONG * 10, max_audio_ms=90_000))
        assert engine.frames_made["stalled"] < total
        made = engine.frames_made["stalled"]
        await asyncio.sleep(0.5)
        assert engine.frames_made["stalled"] == made  # no longer generating
        metrics = httpx.get(server.http + "/metrics").text
        assert "csm_slow_clients_total 1.0" in metrics
        await ws.close()


async def test_out_of_memory_fails_one_request_and_the_server_keeps_serving(settings_factory):
    """OOM in one request: an out_of_memory error frame; /ready stays 200 and the next request works."""
    engine = FakeEngine(fail_at_frame=1, fail_with=torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    with running_server(settings_factory(engine="fake"), engine) as server:
        async with CsmClient(server.ws) as client:
            with pytest.raises(ServerError) as caught:
                await client.synthesize(LONG)
            assert caught.value.code == "out_of_memory"
            assert httpx.get(server.http + "/ready").status_code == 200
            engine.fail_at_frame = None
            assert (await client.synthesize("After the OOM.")).pcm


async def test_cuda_error_makes_the_server_not_ready(settings_factory):
    """A CUDA error is fatal: the request fails and /ready and /health turn 503."""
    engine = FakeEngine(fail_at_frame=0, fail_with=RuntimeError("CUDA error: an illegal memory access was encountered"))
    with running_server(settings_factory(engine="fake"), engine) as server:
        async with CsmClient(server.ws) as client:
            with pytest.raises(ServerError) as caught:
                await client.synthesize("Hello.")
        assert caught.value.code == "model_failed"
        ready = httpx.get(server.http + "/ready")
        assert ready.status_code == 503 and ready.json()["reason"] == "failed"
        assert httpx.get(server.http + "/health").json()["status"] == "failed"


async def test_idle_connection_is_closed(settings_factory):
    """A connection with nothing to do for idle_timeout_s is closed normally."""
    with running_server(settings_factory(engine="fake", idle_timeout_s=0.3), FakeEngine()) as server:
        async with websockets.connect(server.ws) as ws:
            started = time.monotonic()
            code = await close_code(ws)
            assert code == 1000
            assert ws.close_reason == "idle timeout"
            assert time.monotonic() - started < 5


async def test_ready_is_503_while_loading(settings_factory):
    """/ready says loading until the model is ready."""
    with running_server(settings_factory(engine="fake"), FakeEngine(load_delay_s=1.0)) as server:
        response = httpx.get(server.http + "/ready")
        assert (response.status_code, response.json()["reason"]) == (503, "loading")
        server.wait_ready()
        assert httpx.get(server.http + "/ready").json() == {"ready": True}


async def test_metrics_count_requests_audio_latency_and_cancellations(settings_factory):
    """/metrics exposes TTFA and RTF histograms, outcomes, audio seconds, active streams and cancellations."""
    engine = FakeEngine(frame_delay_s=0.02)
    with running_server(settings_factory(engine="fake"), engine) as server:
        async with CsmClient(server.ws) as client:
            await client.synthesize("One.")
            await client.synthesize("Two.")
            await client.send({"text": LONG, "request_id": "x", "chunk_ms": 80})
            await client.ws.recv()
            await client.send({"type": "cancel"})
            [m async for m in client.receive()]
        text = httpx.get(server.http + "/metrics").text
    assert 'csm_requests_total{endpoint="ws",outcome="ok"} 2.0' in text
    assert 'csm_requests_total{endpoint="ws",outcome="cancelled"} 1.0' in text
    assert "csm_cancellations_total 1.0" in text
    assert "csm_time_to_first_audio_seconds_count 2.0" in text
    assert "csm_real_time_factor_count 2.0" in text
    assert "csm_active_streams 0.0" in text
    assert "csm_queue_depth 0.0" in text
    audio = float(next(line for line in text.splitlines() if line.startswith("csm_audio_seconds_total")).split()[1])
    assert audio > 0.3
