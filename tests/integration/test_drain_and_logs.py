"""A real server process: graceful drain on SIGTERM, JSON logs with request ids, no secrets in logs."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from support.processes import server_process

KEY = "sk-never-log-me-42"


def test_sigterm_drains_in_flight_streams_then_exits(tmp_path):
    """SIGTERM: /ready turns 503, new WebSocket requests are closed 1013, the running stream finishes, exit 0."""
    with server_process(tmp_path, "--engine", "fake", "--fake-frame-delay-ms", "40", "--drain-timeout-s", "30") as server:

        async def scenario():
            async with websockets.connect(server.ws) as ws:
                await ws.send(json.dumps({"text": "A sentence that takes a couple of seconds to speak out loud. " * 2,
                                          "request_id": "inflight"}))
                assert isinstance(await ws.recv(), bytes)
                server.process.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                async with httpx.AsyncClient() as http:
                    ready = await http.get(server.http + "/ready")
                assert ready.status_code == 503 and ready.json()["reason"] == "draining"
                async with websockets.connect(server.ws) as late:
                    with pytest.raises(ConnectionClosed) as caught:
                        while True:
                            await late.recv()
                    assert caught.value.rcvd.code == 1013
                while True:  # the in-flight stream runs to its end
                    message = await asyncio.wait_for(ws.recv(), 30)
                    if isinstance(message, str):
                        return json.loads(message)

        done = asyncio.run(scenario())
        assert done["request_id"] == "inflight" and "error" not in done and done["audio_ms"] > 1000
        assert server.process.wait(30) == 0
        assert "draining" in server.log()


def test_keys_never_appear_in_logs_and_a_warning_says_when_auth_is_off(tmp_path):
    """With keys set, requests carrying them (good and bad) leave no key in the log; without keys, a warning."""
    with server_process(tmp_path, "--engine", "fake", "--log-level", "debug", env={"CSM_API_KEYS": KEY}) as server:
        httpx.post(server.http + f"/generate?token={KEY}", json={"text": "Hi."})
        httpx.post(server.http + "/generate?token=sk-wrong-guess-7", json={"text": "Hi."})
        httpx.post(server.http + "/generate", json={"text": "Hi."}, headers={"Authorization": f"Bearer {KEY}"})

        async def ws_request():
            async with websockets.connect(server.ws + f"?token={KEY}") as ws:
                await ws.send(json.dumps({"text": "Hi."}))
                while isinstance(await ws.recv(), bytes):
                    pass

        asyncio.run(ws_request())
        time.sleep(0.3)
        log = server.log()
    assert "POST /generate" in log  # the access log is there...
    assert KEY not in log and "sk-wrong-guess-7" not in log  # ...without the keys
    with server_process(tmp_path, "--engine", "fake") as server:
        assert "no API keys configured" in server.log()


def test_json_logs_carry_the_request_id(tmp_path):
    """--log-format json: one JSON object per line; a request's lines carry its request_id."""
    with server_process(tmp_path, "--engine", "fake", "--log-format", "json") as server:

        async def failing_request():
            async with websockets.connect(server.ws) as ws:
                await ws.send(json.dumps({"text": "Hi.", "voice": "no-such-voice", "request_id": "req-77"}))
                return json.loads(await ws.recv())

        assert asyncio.run(failing_request())["error"]["code"] == "invalid_request"
        time.sleep(0.3)
        lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert lines and all({"time", "level", "logger", "message", "request_id"} <= set(line) for line in lines)
    assert any(line["request_id"] == "req-77" and "unknown voice" in line["message"] for line in lines)


def test_websocket_compression_is_not_negotiated(tmp_path):
    """Audio does not compress: the server declines permessage-deflate even when the client offers it."""
    with server_process(tmp_path, "--engine", "fake") as server:

        async def handshake():
            async with websockets.connect(server.ws, compression="deflate") as ws:
                return ws.response.headers.get("Sec-WebSocket-Extensions")

        assert asyncio.run(handshake()) is None
