"""A fair share for every tenant (an API key): rows in turn, a quota per key, only live work queued,
no prompt cache shared across keys, and uploads that never pause a talking stream. Real servers on
loopback; the fake engine counts admissions and rows per step, the offline model prefill positions."""

from __future__ import annotations

import asyncio
import io
import json
import time
from urllib.parse import urlencode

import httpx
import numpy as np
import pytest
import soundfile as sf
import websockets

from csmserve.engine.csm import CsmEngine
from csmserve.engine.fake import FakeEngine
from support.routes import counter
from support.servers import running_server

HOG, OTHER = "hog-key-0123456789", "other-key-0123456789"  # key-1 and key-2, in this order
#: 64 frames of the fake engine's tone: long enough to hold a row while the test queues others.
SENTENCE = "This sentence is long enough to keep a row of the batch busy for a good while now. " * 3


async def until(condition, timeout: float = 20.0) -> None:
    """Poll ``condition()`` until it holds (a guard against hanging, not a measure of time)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.005)


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


async def speak(server, key: str | None, request_id: str, text: str = SENTENCE, **fields) -> tuple[int, dict]:
    """One request on /ws/generate: (binary chunks received, the final event)."""
    chunks = 0
    async with websockets.connect(server.ws, additional_headers=bearer(key) if key else {}) as ws:
        await ws.send(json.dumps({"text": text, "request_id": request_id, "chunk_ms": 80, **fields}))
        while True:
            message = await asyncio.wait_for(ws.recv(), 30)
            if isinstance(message, bytes):
                chunks += 1
            elif (event := json.loads(message)).get("done"):
                return chunks, event


def multi_stream_url(server) -> str:
    query = urlencode({"output_format": "pcm_24000"})
    return f"ws://127.0.0.1:{server.port}/v1/text-to-speech/0/multi-stream-input?{query}"


# -- rows in turn -----------------------------------------------------------------------------------


async def test_with_one_key_hogging_the_rows_another_keys_requests_are_admitted_in_turn(settings_factory):
    """Two rows; one key queues six long requests, then another key two: the other key gets the next
    free row, and its second request the one after the hog's next, not the rows after the hog's queue."""
    engine = FakeEngine(frame_delay_s=0.01, max_batch=2)
    with running_server(settings_factory(engine="fake", api_keys=f"{HOG},{OTHER}"), engine) as server:
        hog = [asyncio.create_task(speak(server, HOG, f"hog-{i}", SENTENCE * 2)) for i in range(6)]
        await until(lambda: (engine.capacity().active, engine.capacity().waiting) == (2, 4))
        other = [asyncio.create_task(speak(server, OTHER, f"other-{i}", SENTENCE * 2)) for i in range(2)]
        await until(lambda: engine.capacity().waiting == 6)
        assert len(engine.admitted) == 2  # the hog's first two still hold the rows
        results = await asyncio.gather(*hog, *other)
    assert all("error" not in event for _, event in results)
    assert [tenant for tenant, _ in engine.admitted[:2]] == ["key-1", "key-1"]
    after = [tenant for tenant, _ in engine.admitted[2:]]
    assert after[0] == "key-2" and after[1:3].count("key-2") == 1  # first come would be five places later


async def test_a_key_streams_at_most_its_quota_and_another_key_still_gets_in(settings_factory):
    """max_streams_per_key 2: one socket's two finishing contexts speak, its third is refused
    (too_many_concurrent_requests, close 1013) though the server has room; the other key streams."""
    engine = FakeEngine(frame_delay_s=0.02)
    settings = settings_factory(engine="fake", api_keys=f"{HOG},{OTHER}", max_streams_per_key=2)
    with running_server(settings, engine) as server:
        async with websockets.connect(multi_stream_url(server), additional_headers={"xi-api-key": HOG}) as ws:
            for cid in ("a", "b"):
                await ws.send(json.dumps({"text": SENTENCE, "context_id": cid, "flush": True}))
                await ws.send(
                    json.dumps({"context_id": cid, "close_context": True})
                )  # finishing, still speaking
            talking = set()
            while talking != {"a", "b"}:
                talking.add(json.loads(await asyncio.wait_for(ws.recv(), 10))["contextId"])
            await ws.send(json.dumps({"text": SENTENCE, "context_id": "c", "flush": True}))
            messages = []
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    messages.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
        hog_steps = list(engine.batch_sizes)
        chunks, event = await speak(server, OTHER, "other")
    refusals = [m for m in messages if m.get("error") == "too_many_concurrent_requests"]
    assert len(refusals) == 1 and "this API key" in refusals[0]["message"]
    assert closed.value.rcvd.code == 1013
    assert max(hog_steps) == 2
    assert "error" not in event and chunks > 0


async def test_one_sockets_closed_contexts_count_until_their_audio_has_ended(settings_factory):
    """Open, flush, close in a loop on one multi-stream-input socket: closed contexts still count until
    their isFinal, so at most five speak at once and the sixth to tenth are refused; once they have
    ended, a new context speaks."""
    engine = FakeEngine(frame_delay_s=0.02)
    with running_server(settings_factory(engine="fake"), engine) as server:
        async with websockets.connect(multi_stream_url(server)) as ws:
            for i in range(10):
                await ws.send(json.dumps({"text": SENTENCE, "context_id": f"c{i}", "flush": True}))
                await ws.send(json.dumps({"context_id": f"c{i}", "close_context": True}))
            finals, refused = set(), 0
            while len(finals) < 5:
                message = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if message.get("isFinal"):
                    finals.add(message["contextId"])
                refused += "still speaking" in message.get("message", "")
            await ws.send(json.dumps({"text": "And now another one.", "context_id": "late", "flush": True}))
            late = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert finals == {f"c{i}" for i in range(5)} and refused == 5
    assert max(engine.batch_sizes) == 5
    assert late.get("contextId") == "late" and late["audio"]


# -- only live work waits ---------------------------------------------------------------------------


async def test_requests_that_go_away_while_queued_leave_the_queue_at_once(settings_factory):
    """One row, busy; two queued requests whose clients disconnect leave the queue while the row is still
    busy (three rounds, a queue of two), were never given a row, and an honest request then queues."""
    engine = FakeEngine(frame_delay_s=0.01, max_batch=1, max_queue=2)
    with running_server(settings_factory(engine="fake"), engine) as server:
        busy = asyncio.create_task(speak(server, None, "busy", SENTENCE * 10, max_audio_ms=90_000))
        await until(lambda: engine.capacity().active == 1)
        for storm in range(3):
            gone = [await websockets.connect(server.ws) for _ in range(2)]
            for i, ws in enumerate(gone):
                await ws.send(json.dumps({"text": "Never mind.", "request_id": f"gone-{storm}-{i}"}))
            await until(lambda: engine.capacity().waiting == 2)
            for ws in gone:
                await ws.close()
            await until(lambda: engine.capacity().waiting == 0)
            assert engine.capacity().active == 1 and not busy.done()
        honest = asyncio.create_task(speak(server, None, "honest", "Hello."))
        await until(lambda: engine.capacity().waiting == 1)
        busy.cancel()
        chunks, event = await honest
    assert "error" not in event and chunks > 0
    assert not any(rid.startswith("gone") for _, rid in engine.admitted)


# -- the offline model: prompt cache per tenant, encoding beside the steps ----------------------------


class CountedEncodes(CsmEngine):
    """The CSM engine whose every encode finishes only after ``STEPS`` more engine steps: a stand-in for
    a long clip, measured in steps. An encode on the model thread would wait for ever (no step runs)."""

    STEPS = 8

    def encode_audio(self, audio: np.ndarray) -> np.ndarray:
        start = self.capacity().steps
        deadline = time.monotonic() + 20
        while self.capacity().steps < start + self.STEPS:
            if time.monotonic() > deadline:
                raise TimeoutError("the engine made no step while a clip was encoding")
            time.sleep(0.002)
        return super().encode_audio(audio)


@pytest.fixture(scope="module")
def tenants_server(tiny_model_dir, tmp_path_factory):
    """The offline model behind two keys, with :class:`CountedEncodes`."""
    from csmserve.config import Settings

    settings = Settings(
        model=str(tiny_model_dir),
        device="cpu",
        dtype="float32",
        torch_threads=1,
        max_batch=2,
        warmup=False,
        api_keys=f"{HOG},{OTHER}",
        host="127.0.0.1",
        port=0,
        audio_dir=tmp_path_factory.mktemp("audio"),
        voices_dir=tmp_path_factory.mktemp("voices"),
    )
    with running_server(settings, CountedEncodes(settings)) as server:
        server.wait_ready()
        yield server


def wav_clip(seconds: float = 1.0, rate: int = 24_000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buffer = io.BytesIO()
    sf.write(
        buffer, (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), rate, format="WAV", subtype="PCM_16"
    )
    return buffer.getvalue()


async def upload(http: httpx.AsyncClient, key: str, name: str) -> httpx.Response:
    form = {"name": name, "transcript": "This is how I sound.", "speaker_id": "1"}
    return await http.post(
        "/v1/voices", headers=bearer(key), files={"audio": ("v.wav", wav_clip())}, data=form
    )


def test_tenant_bs_reused_positions_do_not_depend_on_tenant_as_text(tenants_server):
    """Tenant A speaks a secret (two different ones), then tenant B a guess in the same registered voice:
    B reuses the voice's positions, the same count whatever A said; B repeating itself reuses its own."""

    def reused() -> float:
        return counter(
            httpx.get(tenants_server.http + "/metrics", headers=bearer(OTHER)).text,
            "csm_prefill_positions_total",
            kind="reused",
        )

    def generate(key: str, text: str) -> None:
        body = {"text": text, "voice": "shared", "max_audio_ms": 160, "seed": 1}
        response = httpx.post(tenants_server.http + "/generate", json=body, headers=bearer(key), timeout=60)
        assert response.status_code == 200, response.text

    async def register() -> httpx.Response:
        async with httpx.AsyncClient(base_url=tenants_server.http, timeout=120) as http:
            return await upload(http, HOG, "shared")

    assert asyncio.run(register()).status_code == 201
    guess = "My PIN is 1234."
    counts = []
    for secret in ("My PIN is 1234.", "My PIN is 9876."):
        generate(HOG, secret)
        before = reused()
        generate(OTHER, guess)
        counts.append(reused() - before)
    before = reused()
    generate(OTHER, guess)
    own = reused() - before
    assert counts[0] == counts[1] > 0  # the voice's positions, whatever A's text
    assert own > counts[0]


async def test_a_talking_stream_keeps_stepping_while_voice_uploads_encode(tenants_server):
    """Four uploads while a stream talks: each encode needs STEPS engine steps to finish, so all four
    finishing proves the steps went on; the talking stream received frames in them; and the codes
    encoded beside the steps are those of the same clip encoded with nothing else running."""
    received = 0
    async with websockets.connect(tenants_server.ws, additional_headers=bearer(OTHER)) as ws:

        async def talk() -> dict:
            nonlocal received
            await ws.send(json.dumps({"text": SENTENCE * 4, "chunk_ms": 80, "max_audio_ms": 90_000}))
            while True:
                message = await asyncio.wait_for(ws.recv(), 30)
                if isinstance(message, bytes):
                    received += 1
                elif (event := json.loads(message)).get("done"):
                    return event

        talker = asyncio.create_task(talk())
        await until(lambda: received > 0)
        async with httpx.AsyncClient(base_url=tenants_server.http, timeout=120) as http:
            start = received
            answers = await asyncio.gather(*(upload(http, HOG, f"upload-{i}") for i in range(4)))
            during, still_talking = received - start, not talker.done()
        await ws.send(json.dumps({"type": "cancel"}))  # barge-in: the stream ends within a frame
        assert (await talker).get("cancelled")
    assert [a.status_code for a in answers] == [201] * 4
    assert still_talking and during >= 2 * CountedEncodes.STEPS
    await until(lambda: tenants_server.engine.capacity().active == 0)
    async with httpx.AsyncClient(base_url=tenants_server.http, timeout=120) as http:
        alone = (await upload(http, HOG, "upload-alone")).json()["id"]
    voices = tenants_server.app.state.csm.voices.store
    for answer in answers:
        assert np.array_equal(voices.codes(answer.json()["id"]), voices.codes(alone))
