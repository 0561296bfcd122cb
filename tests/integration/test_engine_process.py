"""The engine in its own process: every API answers as with the engine beside it, several API workers feed
one engine, a dead engine is restarted while the API stays up, and nothing outlives the server.

The engine here is the fake one (deterministic tones, one step per ``fake_frame_delay_ms``), run in a
spawned process exactly as the CSM engine is on a GPU.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import time

import httpx
import numpy as np
import pytest
import websockets

from csmserve.client import CsmClient
from support.processes import server_process
from support.routes import STREAMING_ROUTES, counter
from support.servers import running_server

TEXT = "The engine runs in a process of its own, and this sentence travels there and back."


async def seed_audio(server, text: str = TEXT, seed: int = 1) -> bytes:
    async with CsmClient(server.ws) as client:
        return (await client.synthesize(text, 2, seed=seed)).pcm


async def elevenlabs_socket_audio(server, text: str = TEXT) -> bytes:
    url = f"ws://127.0.0.1:{server.port}/v1/text-to-speech/0/multi-stream-input?output_format=pcm_24000"
    audio = b""
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"text": " ", "context_id": "c"}))
        await ws.send(json.dumps({"text": text, "context_id": "c", "flush": True}))
        await ws.send(json.dumps({"context_id": "c", "close_context": True}))
        while True:
            message = json.loads(await asyncio.wait_for(ws.recv(), 20))
            assert "error" not in message, message
            audio += base64.b64decode(message.get("audio") or "")
            if message.get("isFinal"):
                return audio


def http_audio(server, route: str) -> bytes:
    """The audio bytes of one HTTP route (PCM at 24 kHz, or a WAV file for /generate)."""
    if route == "rest":
        answer = httpx.post(server.http + "/generate", json={"text": TEXT, "seed": 1, "speaker_id": 2},
                            headers={"Accept": "audio/wav"}, timeout=30)
    elif route == "openai":
        answer = httpx.post(server.http + "/v1/audio/speech", json={
            "model": "tts-1", "input": TEXT, "voice": "alloy", "response_format": "pcm", "stream": True}, timeout=30)
    else:
        answer = httpx.post(server.http + "/v1/text-to-speech/0/stream?output_format=pcm_24000", json={"text": TEXT},
                            timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.content


def audio_of_every_api(server) -> dict[str, bytes]:
    return {
        "seed websocket": asyncio.run(seed_audio(server)),
        "elevenlabs websocket": asyncio.run(elevenlabs_socket_audio(server)),
        **{route: http_audio(server, route) for route in ("rest", "openai", "elevenlabs http")},
    }


def test_every_api_answers_the_same_bytes_with_the_engine_in_its_own_process(settings_factory):
    """The seed WebSocket, REST, OpenAI, ElevenLabs HTTP and socket routes give the same bytes whether the
    engine runs beside the API or in its own process."""
    results = []
    for mode in ("off", "on"):
        settings = settings_factory(engine="fake", engine_process=mode, fake_frame_delay_ms=2)
        with running_server(settings) as server:
            server.wait_ready()
            assert server.engine.info.extra.get("engine_process", False) == (mode == "on")
            results.append(audio_of_every_api(server))
    assert results[0] == results[1]
    assert all(len(audio) > 20_000 for audio in results[1].values())


async def cancel_after_one_chunk(server, text: str = TEXT * 6) -> dict:
    """Start a long stream, take one chunk, cancel it; its done frame."""
    async with websockets.connect(server.ws) as ws:
        await ws.send(json.dumps({"text": text, "request_id": "long", "max_audio_ms": 60_000}))
        while not isinstance(await ws.recv(), bytes):
            pass
        await ws.send(json.dumps({"type": "cancel", "request_id": "long"}))
        while True:
            frame = await asyncio.wait_for(ws.recv(), 10)
            if isinstance(frame, str) and json.loads(frame).get("done"):
                return json.loads(frame)


def active_rows(server) -> int:
    return httpx.get(server.http + "/health").json()["capacity"]["active_rows"]


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_cancel_and_a_slow_client_free_their_row_in_the_engine_process(settings_factory):
    """Cancels and credits cross the process boundary: a cancelled stream leaves the engine's batch at
    once, and a client that stops reading is cut after max_lag_s (its stream sat out the steps)."""
    settings = settings_factory(engine="fake", engine_process="on", fake_frame_delay_ms=2, max_lag_s=0.5,
                                max_text_chars=40_000, max_audio_ms=900_000)
    with running_server(settings) as server:
        server.wait_ready()
        done = asyncio.run(cancel_after_one_chunk(server, "Talk for a long while. " * 400))
        assert done["request_id"] == "long" and done.get("cancelled") and "error" not in done
        assert wait_for(lambda: active_rows(server) == 0)
        # A raw socket that reads nothing, asking for far more audio than socket buffers hold.
        sock = STREAMING_ROUTES[0].open(server.port, "Never read. " * 3000, "non-reader")
        try:
            assert wait_for(lambda: counter(httpx.get(server.http + "/metrics").text, "csm_slow_clients_total") >= 1,
                            timeout=30)
            assert wait_for(lambda: active_rows(server) == 0)
        finally:
            sock.close()


def test_a_text_stream_continues_in_the_engine_process_and_is_released_at_its_end(settings_factory):
    """A streamed text's sentences join without a seam (the engine keeps the stream's state under its
    id) and that state is forgotten when the stream ends."""
    settings = settings_factory(engine="fake", engine_process="on", fake_frame_delay_ms=2)

    async def stream(server) -> tuple[bytes, dict]:
        audio = b""
        async with websockets.connect(server.ws) as ws:
            for part in ("First sentence here. ", "Second one follows. ", "And a third."):
                await ws.send(json.dumps({"type": "text", "text": part, "context_id": "s"}))
            await ws.send(json.dumps({"type": "end", "context_id": "s"}))
            while True:
                frame = await asyncio.wait_for(ws.recv(), 20)
                if isinstance(frame, bytes):
                    audio += frame
                elif json.loads(frame).get("done"):
                    return audio, json.loads(frame)

    results = []
    for mode in ("off", "on"):
        with running_server(settings.model_copy(update={"engine_process": mode})) as server:
            server.wait_ready()
            results.append(asyncio.run(stream(server)))
    assert results[0][0] == results[1][0] and len(results[1][0]) > 0


@pytest.fixture
def process_server(tmp_path):
    def start(*args: str):
        return server_process(tmp_path, "--engine", "fake", *args)

    return start


def children(pid: int) -> set[int]:
    """Every live descendant of ``pid``."""
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for task in os.listdir(f"/proc/{parent}/task"):
            with open(f"/proc/{parent}/task/{task}/children") as f:
                for child in f.read().split():
                    if int(child) not in found:
                        found.add(int(child))
                        todo.append(int(child))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


async def seeded_clients(server, seeds) -> list[bytes]:
    """One caller per seed, all at once, the same text: each caller's audio differs by its seed only."""
    return await asyncio.gather(*(seed_audio(server, "Every caller speaks now.", seed) for seed in seeds))


def test_two_api_workers_feed_one_engine_and_each_caller_hears_its_own_audio(process_server):
    """Two API worker processes on one port, one engine process: eight callers at once each get exactly
    the audio they get alone; both workers served; SIGTERM leaves no process behind."""
    with process_server("--api-workers", "2", "--fake-frame-delay-ms", "5") as server:
        descendants = children(server.process.pid)
        assert len(descendants) >= 3  # an engine and two API workers (and multiprocessing's helper)
        together = asyncio.run(seeded_clients(server, range(8)))
        alone = [asyncio.run(seeded_clients(server, [seed]))[0] for seed in range(8)]
        assert together == alone and len(set(together)) == 8
        metrics = httpx.get(server.http + "/metrics").text
        assert 'csm_requests_total{endpoint="ws",outcome="ok"} 16.0' in metrics  # counted across workers
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 0
    # multiprocessing's resource tracker leaves when it sees its parent gone: allow it a moment.
    assert wait_for(lambda: not [pid for pid in descendants if alive(pid)], timeout=10)


def test_killing_the_engine_mid_stream_ends_the_stream_the_api_says_why_and_recovers(process_server):
    """kill -9 of the engine process: the talking client gets an error frame within a few seconds (never a
    hang), /ready is 503 with the reason, the engine comes back, a new request succeeds, and the API
    process never exited."""
    with process_server("--engine-process", "on", "--fake-frame-delay-ms", "30") as server:
        engine_pid = httpx.get(server.http + "/health").json()["engine_pid"]

        async def talk_then_kill() -> dict:
            async with websockets.connect(server.ws) as ws:
                await ws.send(json.dumps({"text": TEXT * 8, "max_audio_ms": 60_000}))
                while not isinstance(await ws.recv(), bytes):
                    pass
                os.kill(engine_pid, signal.SIGKILL)
                while True:
                    frame = await asyncio.wait_for(ws.recv(), 10)
                    if isinstance(frame, str) and json.loads(frame).get("done"):
                        return json.loads(frame)

        done = asyncio.run(talk_then_kill())
        assert done["error"]["code"] == "model_failed" and "engine" in done["error"]["message"]
        ready = httpx.get(server.http + "/ready")  # the engine is back about a second after its death
        health = httpx.get(server.http + "/health").json()
        assert ready.status_code == 503 and ready.json()["reason"] == "failed"
        assert "engine process stopped" in health["error"]["message"]
        assert wait_for(lambda: httpx.get(server.http + "/ready").status_code == 200, timeout=30)
        assert httpx.get(server.http + "/health").json()["engine_pid"] != engine_pid
        assert len(asyncio.run(seed_audio(server))) > 0
        assert server.process.poll() is None
        assert "engine process" in server.log() and "restarting" in server.log()


def test_sigterm_lets_in_flight_streams_finish_then_stops_the_engine(process_server):
    """SIGTERM with a stream in flight: the stream gets all its audio and its done frame, the server exits
    0, and the engine process is gone."""
    with process_server("--engine-process", "on", "--fake-frame-delay-ms", "20") as server:
        engine_pid = httpx.get(server.http + "/health").json()["engine_pid"]

        async def talk_through_sigterm() -> tuple[int, dict]:
            audio = 0
            async with websockets.connect(server.ws) as ws:
                await ws.send(json.dumps({"text": TEXT, "max_audio_ms": 4000}))
                while True:
                    frame = await asyncio.wait_for(ws.recv(), 20)
                    if isinstance(frame, bytes):
                        if not audio:  # talking: now the server is told to stop
                            server.process.send_signal(signal.SIGTERM)
                        audio += len(frame)
                    elif json.loads(frame).get("done"):
                        return audio, json.loads(frame)

        audio, done = asyncio.run(talk_through_sigterm())
        assert "error" not in done and audio == 2 * done["samples"]
        assert server.process.wait(30) == 0
    assert not alive(engine_pid)


def test_the_csm_engine_in_its_own_process_speaks_the_same_audio_as_beside_the_api(settings_factory, tiny_model_dir):
    """The offline CSM model, float32: a seeded request with a client's turn given as audio (encoded by the
    engine before it queues the request) gives the same samples through the engine process as in one."""
    pcm = (np.sin(np.arange(24_000) / 9) * 8000).astype("<i2").tobytes()
    request = {
        "text": "The model itself, in a process of its own.", "seed": 5, "max_audio_ms": 800,
        "context": [{"speaker_id": 1, "text": "Earlier, someone said this.", "audio": base64.b64encode(pcm).decode()}],
    }

    async def speak(server) -> bytes:
        audio = b""
        async with websockets.connect(server.ws) as ws:
            await ws.send(json.dumps(request))
            while isinstance(frame := await asyncio.wait_for(ws.recv(), 120), bytes):
                audio += frame
        assert "error" not in json.loads(frame), frame
        return audio

    results = []
    for mode in ("off", "on"):
        settings = settings_factory(model=str(tiny_model_dir), device="cpu", dtype="float32", engine_process=mode,
                                    max_batch=2, warmup=False, torch_threads=1)  # same kernels in both
        with running_server(settings) as server:
            server.wait_ready(timeout=180)
            results.append(asyncio.run(speak(server)))
    assert len(results[0]) > 0
    samples = [np.frombuffer(r, dtype="<i2").astype(np.int32) for r in results]
    assert samples[0].shape == samples[1].shape and np.abs(samples[0] - samples[1]).max() <= 1
