"""/ws/generate over a real socket: the seed protocol, request options, bad input, cancel."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import websockets

from csmserve.audio.pcm import float_to_pcm16
from csmserve.client import CsmClient, ServerError
from csmserve.engine import SynthesisRequest
from csmserve.engine.fake import FakeEngine
from support.servers import running_server

TEXT = "Hello world, this is a test of the streaming server."


def expected_pcm(engine: FakeEngine, text: str, speaker_id: int = 0, seed: int | None = None, **kw) -> bytes:
    request = SynthesisRequest(text=text, speaker_id=speaker_id, seed=seed, max_audio_ms=90_000, **kw)
    return float_to_pcm16(engine.render(request)).tobytes()


async def test_seed_client_receives_9600_byte_chunks_then_done(fake_server):
    """A plain websockets client sending the seed message gets 200 ms chunks and then {"done": true}."""
    async with websockets.connect(fake_server.ws) as ws:
        await ws.send(json.dumps({"text": TEXT, "speaker_id": 0}))
        chunks = []
        while True:
            message = await ws.recv()
            if isinstance(message, bytes):
                chunks.append(message)
                continue
            done = json.loads(message)
            break
    assert done["done"] is True
    assert len(chunks) >= 2
    assert all(len(c) == 9600 for c in chunks[:-1])
    assert 0 < len(chunks[-1]) <= 9600
    assert done["samples"] == sum(len(c) for c in chunks) // 2
    assert done["sample_rate"] == 24000


async def test_received_pcm_equals_engine_audio_sample_for_sample(fake_server):
    """Nothing is lost, duplicated or reordered between the engine and the client."""
    async with CsmClient(fake_server.ws) as client:
        result = await client.synthesize(TEXT, 3, seed=7)
    assert result.pcm == expected_pcm(fake_server.engine, TEXT, 3, seed=7)


@pytest.mark.parametrize("chunk_ms", [20, 100, 333, 1000])
async def test_chunk_ms_sets_the_chunk_size(fake_server, chunk_ms):
    """Every chunk but the last holds exactly chunk_ms of audio."""
    async with CsmClient(fake_server.ws) as client:
        result = await client.synthesize(TEXT * 3, chunk_ms=chunk_ms)
    size = 2 * 24000 * chunk_ms // 1000
    assert all(s == size for s in result.chunk_sizes[:-1])
    assert 0 < result.chunk_sizes[-1] <= size
    assert result.pcm == expected_pcm(fake_server.engine, TEXT * 3)


async def test_first_chunk_ms_makes_only_the_first_chunk_smaller(fake_server):
    """first_chunk_ms shortens the first chunk; the rest keep chunk_ms."""
    async with CsmClient(fake_server.ws) as client:
        result = await client.synthesize(TEXT, first_chunk_ms=40, chunk_ms=200)
    assert result.chunk_sizes[0] == 1920
    assert all(s == 9600 for s in result.chunk_sizes[1:-1])


async def test_connection_serves_several_requests_in_order(fake_server):
    """After done, the same connection accepts the next request; request_id is echoed."""
    async with CsmClient(fake_server.ws) as client:
        first = await client.synthesize("First sentence.", 1, request_id="a")
        second = await client.synthesize("Second one, a bit longer.", 2, request_id="b")
    assert first.done["request_id"] == "a" and second.done["request_id"] == "b"
    assert first.pcm == expected_pcm(fake_server.engine, "First sentence.", 1)
    assert second.pcm == expected_pcm(fake_server.engine, "Second one, a bit longer.", 2)


async def test_pipelined_requests_are_answered_in_order(fake_server):
    """Requests sent back to back are streamed one after another, each ending with its own done."""
    async with CsmClient(fake_server.ws) as client:
        for rid in ("one", "two", "three"):
            await client.send({"text": f"Request {rid}.", "request_id": rid})
        for rid in ("one", "two", "three"):
            pcm = b"".join([c async for c in client.receive()])
            assert client.last_done["request_id"] == rid
            assert pcm == expected_pcm(fake_server.engine, f"Request {rid}.")


async def test_max_audio_ms_bounds_the_audio(fake_server):
    """max_audio_ms caps the utterance."""
    async with CsmClient(fake_server.ws) as client:
        result = await client.synthesize(TEXT * 5, max_audio_ms=400)
    assert len(result.pcm) // 2 <= 24000 * 400 // 1000


async def test_unknown_fields_are_ignored_and_reported(fake_server):
    """An unknown field does not fail the request; done lists it."""
    async with CsmClient(fake_server.ws) as client:
        result = await client.synthesize("Hi there.", voice_style="calm")
    assert result.done["ignored_fields"] == ["voice_style"]


BAD_MESSAGES = {
    "malformed JSON": '{"text": "Hello", ',
    "not an object": '["Hello", 0]',
    "missing text": '{"speaker_id": 0}',
    "empty text": '{"text": "", "speaker_id": 0}',
    "blank text": '{"text": "   ", "speaker_id": 0}',
    "non-string text": '{"text": 42, "speaker_id": 0}',
    "too-long text": json.dumps({"text": "a" * 4097, "speaker_id": 0}),
    "speaker_id too high": '{"text": "Hello", "speaker_id": 10}',
    "negative speaker_id": '{"text": "Hello", "speaker_id": -1}',
    "string speaker_id": '{"text": "Hello", "speaker_id": "0"}',
    "float speaker_id": '{"text": "Hello", "speaker_id": 1.5}',
    "boolean speaker_id": '{"text": "Hello", "speaker_id": true}',
    "chunk_ms too small": '{"text": "Hello", "chunk_ms": 10}',
    "chunk_ms not a number": '{"text": "Hello", "chunk_ms": "fast"}',
    "negative temperature": '{"text": "Hello", "temperature": -1}',
    "string temperature": '{"text": "Hello", "temperature": "hot"}',
    "zero top_k": '{"text": "Hello", "top_k": 0}',
    "negative seed": '{"text": "Hello", "seed": -3}',
    "object request_id": '{"text": "Hello", "request_id": {"a": 1}}',
    "max_audio_ms too large": '{"text": "Hello", "max_audio_ms": 999999999}',
    "unknown type": '{"type": "dance", "text": "Hello"}',
}


@pytest.mark.parametrize("raw", list(BAD_MESSAGES.values()), ids=list(BAD_MESSAGES))
async def test_bad_message_gets_an_error_frame_and_the_connection_stays_usable(fake_server, raw):
    """Each bad input ends with {"done": true, "error": {...}}; a valid request then succeeds."""
    async with websockets.connect(fake_server.ws) as ws:
        await ws.send(raw)
        event = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert event["done"] is True
        assert event["error"]["code"] == "invalid_request"
        assert event["error"]["message"]
        await ws.send(json.dumps({"text": "Still here?", "speaker_id": 0}))
        messages = []
        while True:
            message = await asyncio.wait_for(ws.recv(), 5)
            messages.append(message)
            if isinstance(message, str):
                break
    assert json.loads(messages[-1]) == {**json.loads(messages[-1]), "done": True}
    assert "error" not in json.loads(messages[-1])
    assert any(isinstance(m, bytes) for m in messages)


async def test_speaker_id_error_names_the_allowed_range(fake_server):
    """The error message says what to send instead."""
    async with CsmClient(fake_server.ws) as client:
        with pytest.raises(ServerError) as caught:
            await client.synthesize("Hello", 12)
    assert caught.value.event["error"] == {
        "code": "invalid_request",
        "message": "speaker_id must be an integer from 0 to 9",
    }


async def test_binary_frame_is_refused_with_an_error(fake_server):
    """Binary data where JSON was expected is an error frame, not a closed socket."""
    async with websockets.connect(fake_server.ws) as ws:
        await ws.send(b"\x00\x01\x02")
        event = json.loads(await ws.recv())
        assert event["error"]["code"] == "invalid_request"
        assert "binary" in event["error"]["message"]


async def test_error_echoes_the_request_id(fake_server):
    """A rejected request's error carries its request_id, so a client can match it."""
    async with websockets.connect(fake_server.ws) as ws:
        await ws.send(json.dumps({"text": "", "request_id": "r-9"}))
        event = json.loads(await ws.recv())
    assert event["request_id"] == "r-9"


async def test_oversized_message_gets_an_error_frame(settings_factory):
    """A frame above max_message_bytes is refused with message_too_large; the connection stays."""
    engine = FakeEngine()
    with running_server(settings_factory(engine="fake", max_message_bytes=2048), engine) as server:
        async with websockets.connect(server.ws) as ws:
            await ws.send(json.dumps({"text": "x" * 5000}))
            event = json.loads(await ws.recv())
            assert event["error"]["code"] == "message_too_large"
            await ws.send(json.dumps({"text": "ok"}))
            assert isinstance(await ws.recv(), bytes)


async def test_model_failure_ends_that_request_and_the_next_one_works(settings_factory):
    """An exception in the model becomes an error frame; the connection and server keep serving."""
    engine = FakeEngine(fail_at_frame=2)
    with running_server(settings_factory(engine="fake"), engine) as server:
        async with CsmClient(server.ws) as client:
            with pytest.raises(ServerError) as caught:
                await client.synthesize(TEXT, request_id="bad")
            assert caught.value.code == "generation_failed"
            assert caught.value.event["request_id"] == "bad"
            engine.fail_at_frame = None
            result = await client.synthesize(TEXT)
    assert result.pcm == expected_pcm(engine, TEXT)


async def test_cancel_stops_generation_within_one_frame(settings_factory):
    """{"type": "cancel"} answers done+cancelled, and at most one frame is generated after it."""
    engine = FakeEngine(frame_delay_s=0.05)
    with running_server(settings_factory(engine="fake"), engine) as server:
        async with CsmClient(server.ws) as client:
            await client.send({"text": TEXT * 10, "request_id": "long", "chunk_ms": 80})
            await client.ws.recv()  # first audio
            made_at_cancel = engine.frames_made["long"]
            await client.send({"type": "cancel"})
            received = [m async for m in client.receive()]
            assert client.last_done == {"done": True, "cancelled": True, "request_id": "long"}
            await asyncio.sleep(0.3)
            assert engine.frames_made["long"] <= made_at_cancel + 1
            assert engine.frames_made["long"] < engine.num_frames(SynthesisRequest(TEXT * 10, max_audio_ms=90_000))
            assert len(received) <= 2
            # The connection is still usable after the cancel.
            result = await client.synthesize("After the cancel.")
            assert result.pcm == expected_pcm(engine, "After the cancel.")


async def test_cancel_by_id_removes_a_queued_request(settings_factory):
    """A queued request can be cancelled before it starts; it never produces audio."""
    engine = FakeEngine(frame_delay_s=0.02)
    with running_server(settings_factory(engine="fake"), engine) as server:
        async with CsmClient(server.ws) as client:
            await client.send({"text": "First request here.", "request_id": "one"})
            await client.send({"text": "Second request here.", "request_id": "two"})
            await client.send({"type": "cancel", "request_id": "two"})
            events = []
            while len(events) < 2:
                message = await client.ws.recv()
                if isinstance(message, str):
                    events.append(json.loads(message))
    assert {"done": True, "cancelled": True, "request_id": "two", "audio_ms": 0} in events
    assert any(e.get("request_id") == "one" and "cancelled" not in e for e in events)
    assert "two" not in engine.frames_made


async def test_disconnect_mid_stream_stops_generation(settings_factory):
    """A client that goes away cancels its generation between two frames."""
    engine = FakeEngine(frame_delay_s=0.05)
    with running_server(settings_factory(engine="fake"), engine) as server:
        ws = await websockets.connect(server.ws)
        await ws.send(json.dumps({"text": TEXT * 10, "request_id": "gone", "chunk_ms": 80}))
        await ws.recv()
        await ws.close()
        made_at_close = engine.frames_made["gone"]
        await asyncio.sleep(0.5)
        assert engine.frames_made["gone"] <= made_at_close + 1
        total = engine.num_frames(SynthesisRequest(TEXT * 10, max_audio_ms=90_000))
        assert engine.frames_made["gone"] < total


async def test_health_answers_quickly_during_a_long_generation(settings_factory):
    """The event loop never runs the model: /health answers within 100 ms mid-stream."""
    # Each frame takes 300 ms: a model on the event loop would hold /health for that long.
    engine = FakeEngine(frame_delay_s=0.3)
    with running_server(settings_factory(engine="fake"), engine) as server:
        async with CsmClient(server.ws) as client, httpx.AsyncClient() as http:
            await client.send({"text": TEXT, "max_audio_ms": 1200, "chunk_ms": 80})
            await client.ws.recv()
            worst = 0.0
            for _ in range(5):
                started = time.monotonic()
                response = await http.get(server.http + "/health")
                worst = max(worst, time.monotonic() - started)
                assert response.status_code == 200
            assert worst < 0.1
            [m async for m in client.receive()]
