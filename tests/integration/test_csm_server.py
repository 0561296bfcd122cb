"""The real CSM engine (offline checkpoint, CPU) behind the real server."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import websockets

from csmserve.audio.pcm import float_to_pcm16
from csmserve.client import CsmClient
from csmserve.engine import SynthesisRequest


def test_health_says_the_offline_model_is_noise(csm_server):
    """/health reports the offline model as such, with device and dtype."""
    body = httpx.get(csm_server.http + "/health").json()
    assert body["status"] == "healthy"
    assert body["offline_model"] is True
    assert "noise" in body["voice"]
    assert body["device"] == "cpu" and body["dtype"] == "float32"


async def test_seed_client_streams_csm_audio_in_9600_byte_chunks(csm_server):
    """The seed message through the model: 9600-byte chunks, then done with stats."""
    async with websockets.connect(csm_server.ws) as ws:
        await ws.send(json.dumps({"text": "Hello world, this is a test", "speaker_id": 0, "max_audio_ms": 1600}))
        chunks = []
        while True:
            message = await asyncio.wait_for(ws.recv(), 60)
            if isinstance(message, bytes):
                chunks.append(message)
            else:
                done = json.loads(message)
                break
    assert done["done"] is True and "error" not in done
    assert chunks and all(len(c) == 9600 for c in chunks[:-1])
    assert len(b"".join(chunks)) % (2 * 1920) == 0  # whole 80 ms frames
    assert done["ttfa_ms"] > 0 and done["rtf"] > 0


async def test_streamed_pcm_equals_the_engine_audio_for_the_same_seed(csm_server):
    """Nothing lost: what the client receives equals the engine's audio for that seed, sample for sample."""
    request = SynthesisRequest(text="Nothing lost here.", speaker_id=1, max_audio_ms=1200, seed=42)
    engine_audio = np.concatenate([piece async for piece in csm_server.engine.synthesize(request)])
    async with CsmClient(csm_server.ws) as client:
        result = await client.synthesize("Nothing lost here.", 1, max_audio_ms=1200, seed=42, chunk_ms=120)
    assert result.pcm == float_to_pcm16(engine_audio).tobytes()


async def test_same_seed_same_audio_different_seed_different_audio(csm_server):
    """A per-request seed makes sampling reproducible."""
    async with CsmClient(csm_server.ws) as client:
        a = await client.synthesize("Seeded.", max_audio_ms=800, seed=1)
        b = await client.synthesize("Seeded.", max_audio_ms=800, seed=1)
        c = await client.synthesize("Seeded.", max_audio_ms=800, seed=2)
    assert a.pcm == b.pcm
    assert a.pcm != c.pcm


async def test_rest_generate_with_the_model(csm_server):
    """POST /generate through the model returns a downloadable WAV."""
    async with httpx.AsyncClient(base_url=csm_server.http, timeout=60) as http:
        body = (await http.post("/generate", json={"text": "Hi.", "max_audio_ms": 800})).json()
        wav = await http.get(body["url"])
    assert wav.status_code == 200 and wav.content[:4] == b"RIFF"
    assert body["duration_s"] > 0


async def test_simultaneous_clients_each_hear_their_own_solo_audio_and_a_cancel_leaves_the_others_whole(csm_server):
    """Four WebSocket clients at once: each receives its complete audio, equal to its solo run with the same
    seed; a fifth that cancels midway stops early and the four are unaffected."""
    texts = ["First caller here.", "The second caller says a little more.", "Third.", "Fourth caller, hello there."]

    async def speak(text: str, seed: int) -> bytes:
        async with CsmClient(csm_server.ws) as client:
            return (await client.synthesize(text, seed=seed, max_audio_ms=960, chunk_ms=80)).pcm

    async def cancel_midway() -> dict:
        async with websockets.connect(csm_server.ws) as ws:
            await ws.send(json.dumps({"text": "I will hang up early. " * 3, "seed": 9, "max_audio_ms": 4000, "chunk_ms": 80}))
            received = 0
            while received < 2:
                if isinstance(await asyncio.wait_for(ws.recv(), 60), bytes):
                    received += 1
            await ws.send(json.dumps({"type": "cancel"}))
            while True:
                message = await asyncio.wait_for(ws.recv(), 60)
                if isinstance(message, str):
                    return json.loads(message)

    solo = [await speak(text, seed) for seed, text in enumerate(texts)]
    *together, cancelled = await asyncio.gather(*(speak(t, s) for s, t in enumerate(texts)), cancel_midway())
    assert cancelled["done"] is True and cancelled["cancelled"] is True
    for alone, batched in zip(solo, together):
        a, b = np.frombuffer(alone, "<i2").astype(int), np.frombuffer(batched, "<i2").astype(int)
        assert len(a) == len(b) > 0
        # Codes are equal; the codec's batched convolutions may round a sample to the neighbouring int16.
        assert np.abs(a - b).max() <= 1


async def test_a_long_prompt_joining_over_the_websocket_never_stops_a_talking_client(tiny_model_dir, tmp_path):
    """Through the real server: while a caller with a long text is prefilled chunk by chunk, the caller
    already talking gets a frame in every one of those steps (steps counted, not timed)."""
    from csmserve.config import Settings
    from support.recording import Recording
    from support.servers import running_server

    settings = Settings(
        model=str(tiny_model_dir), device="cpu", dtype="float32", host="127.0.0.1", port=0, prefill_chunk=8,
        audio_dir=tmp_path / "audio", voices_dir=tmp_path / "voices", torch_threads=1,
    )
    with running_server(settings) as server:
        server.wait_ready()
        recording = Recording(server.engine._worker.model)
        server.engine._worker.model = recording
        async with CsmClient(server.ws) as talking, CsmClient(server.ws) as joining:
            await talking.send({"text": "I am already talking.", "max_audio_ms": 4000, "request_id": "talking", "chunk_ms": 80})
            talked = talking.receive()
            await talked.__anext__()  # audio is flowing
            long_text = "This caller's prompt is long: " + "many more words, " * 12
            result = await joining.synthesize(long_text, max_audio_ms=400, request_id="joining", chunk_ms=80)
            async for _ in talked:
                pass
    assert len(result.pcm) == 2 * 1920 * 5
    prefill_steps = [rows for prefilled, rows in recording.steps if prefilled == "joining"]
    assert len(prefill_steps) >= 5
    assert all("talking" in rows for rows in prefill_steps)
