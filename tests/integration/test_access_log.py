"""One access line per WebSocket request and per ElevenLabs context, when it ends, like uvicorn's for HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time

import pytest
import websockets

from csmserve.engine.fake import FakeEngine
from support.servers import running_server

KEY = "sk-access-log-key-93"
KEY_ID = hashlib.sha256(KEY.encode()).hexdigest()[:8]
FIELDS = {"route", "request_id", "client", "key_id", "voice", "chars", "audio_s", "first_audio_ms", "outcome"}


@pytest.fixture
def server(settings_factory, caplog):
    """A server with an API key and a fake engine slow enough to cancel or leave mid-stream."""
    caplog.set_level(logging.INFO, logger="csmserve.access")
    engine = FakeEngine(frame_delay_s=0.02)
    with running_server(settings_factory(engine="fake", api_keys=KEY), engine) as running:
        running.wait_ready()
        yield running


def access_lines(caplog, count: int) -> dict[str, list[logging.LogRecord]]:
    """The access records by request id, once ``count`` have been written (polled: a line is written when
    the server notices the end, which for a client gone is after the client returns)."""
    deadline = time.monotonic() + 10
    while True:
        records = [r for r in caplog.records if r.name == "csmserve.access"]
        if len(records) >= count or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    by_id: dict[str, list[logging.LogRecord]] = {}
    for record in records:
        by_id.setdefault(record.access["request_id"], []).append(record)
    return by_id


async def until_done(ws) -> tuple[bytes, dict]:
    pcm = b""
    while True:
        message = await asyncio.wait_for(ws.recv(), 10)
        if isinstance(message, bytes):
            pcm += message
        elif json.loads(message).get("done"):
            return pcm, json.loads(message)


async def test_each_ws_request_ends_with_one_access_line_naming_key_voice_and_figures(server, caplog):
    """A request, a cancelled request and a text stream on one socket: one line each, with the route, the key's
    id (never the key), the voice, the characters, the audio seconds, the first-audio time and the outcome."""
    text = "Hello there, this is the first request."
    headers = {"Authorization": f"Bearer {KEY}"}
    async with websockets.connect(server.ws, additional_headers=headers) as ws:
        await ws.send(json.dumps({"text": text, "speaker_id": 2, "request_id": "a"}))
        _, done = await until_done(ws)
        await ws.send(json.dumps({"text": "A long one. " * 20, "request_id": "b"}))
        assert isinstance(await ws.recv(), bytes)
        await ws.send(json.dumps({"type": "cancel"}))
        _, cancelled = await until_done(ws)
        await ws.send(json.dumps({"type": "text", "context_id": "c", "text": "One sentence. And", "speaker_id": 4}))
        await ws.send(json.dumps({"type": "text", "context_id": "c", "text": " another."}))
        await ws.send(json.dumps({"type": "end", "context_id": "c"}))
        _, streamed = await until_done(ws)
    lines = access_lines(caplog, 3)
    assert cancelled.get("cancelled") and streamed["context_id"] == "c"
    assert {rid: len(records) for rid, records in lines.items()} == {"a": 1, "b": 1, "c": 1}
    a, b, c = (lines[rid][0].access for rid in "abc")
    assert set(a) == FIELDS
    assert a["route"] == "/ws/generate" and a["key_id"] == KEY_ID and a["voice"] == "2" and a["chars"] == len(text)
    assert a["outcome"] == "ok" and a["audio_s"] == pytest.approx(done["audio_ms"] / 1000, abs=0.001)
    assert a["first_audio_ms"] is not None and a["client"].startswith("127.0.0.1:")
    assert b["outcome"] == "cancelled" and b["voice"] == "0"
    assert c["outcome"] == "ok" and c["voice"] == "4" and c["chars"] == len("One sentence. And another.")
    assert c["audio_s"] == pytest.approx(streamed["audio_ms"] / 1000, abs=0.001)
    message = lines["a"][0].getMessage()
    assert f'"/ws/generate" ok key_id={KEY_ID} voice="2" chars={len(text)}' in message and KEY not in message


async def test_a_client_that_leaves_ends_its_running_and_queued_requests_as_disconnected(server, caplog):
    """Leaving mid-stream: the streaming request and the one queued behind it get one line each, disconnected."""
    async with websockets.connect(server.ws + f"?token={KEY}") as ws:
        await ws.send(json.dumps({"text": "A long one. " * 20, "request_id": "running"}))
        await ws.send(json.dumps({"text": "Waiting behind it.", "request_id": "queued"}))
        assert isinstance(await ws.recv(), bytes)
    lines = access_lines(caplog, 2)
    assert {rid: [r.access["outcome"] for r in records] for rid, records in lines.items()} == {
        "running": ["disconnected"], "queued": ["disconnected"],
    }
    assert lines["running"][0].access["audio_s"] > 0 and lines["queued"][0].access["audio_s"] == 0


async def test_each_elevenlabs_context_ends_with_one_access_line(server, caplog):
    """multi-stream-input: a context closed after its flush ends ok, one still open when the socket goes ends
    disconnected; one line each, with the key's id from the xi-api-key header."""
    url = f"ws://127.0.0.1:{server.port}/v1/text-to-speech/3/multi-stream-input?output_format=pcm_24000"
    async with websockets.connect(url, additional_headers={"xi-api-key": KEY}) as ws:
        await ws.send(json.dumps({"text": "Hello there. ", "context_id": "done"}))
        await ws.send(json.dumps({"text": "Still open", "context_id": "open"}))
        await ws.send(json.dumps({"context_id": "done", "flush": True}))
        await ws.send(json.dumps({"context_id": "done", "close_context": True}))
        while not json.loads(await asyncio.wait_for(ws.recv(), 10)).get("isFinal"):
            pass
    lines = access_lines(caplog, 2)
    assert {rid: len(records) for rid, records in lines.items()} == {"done": 1, "open": 1}
    done, still_open = lines["done"][0].access, lines["open"][0].access
    assert done["route"] == "/v1/text-to-speech/{voice_id}/multi-stream-input"
    assert done["outcome"] == "ok" and done["key_id"] == KEY_ID and done["voice"] == "3"
    assert done["chars"] == len("Hello there. ") and done["audio_s"] > 0 and done["first_audio_ms"] is not None
    assert still_open["outcome"] == "disconnected" and still_open["chars"] == len("Still open")
