"""Voice-agent features over /ws/generate: formats, telephony framing, streamed text."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest
import soxr
import websockets

from csmserve.audio.g711 import decode_alaw, decode_ulaw, encode_ulaw
from csmserve.audio.pcm import float_to_pcm16
from csmserve.client import CsmClient
from csmserve.engine import SynthesisRequest
from csmserve.engine.fake import FakeEngine
from support.servers import running_server

TEXT = "Hello world, this is a test of the telephony output."


def engine_audio(engine: FakeEngine, text: str, **kw) -> np.ndarray:
    return engine.render(SynthesisRequest(text=text, max_audio_ms=90_000, **kw))


async def collect(ws) -> tuple[list, dict]:
    """Every frame until done: (binary and JSON media frames, done event)."""
    frames = []
    while True:
        message = await asyncio.wait_for(ws.recv(), 10)
        if isinstance(message, bytes):
            frames.append(message)
            continue
        event = json.loads(message)
        if event.get("done"):
            return frames, event
        frames.append(event)


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
async def test_pcm_at_another_rate_equals_one_shot_resampling(fake_server, rate):
    """Chunked, statefully resampled PCM equals resampling the whole utterance at once (within soxr's tolerance)."""
    async with CsmClient(fake_server.ws) as client:
        result = await client.synthesize(TEXT, sample_rate=rate, chunk_ms=100)
    assert result.done["sample_rate"] == rate
    chunk = 2 * rate * 100 // 1000
    assert all(s == chunk for s in result.chunk_sizes[:-1])
    got = np.frombuffer(result.pcm, dtype="<i2").astype(np.float64) / 32767
    expected = soxr.resample(engine_audio(fake_server.engine, TEXT), 24000, rate, quality="HQ")
    n = min(len(got), len(expected))
    assert abs(len(got) - len(expected)) <= 2
    assert np.max(np.abs(got[:n] - expected[:n])) < 2e-3


@pytest.mark.parametrize("law, decode", [("mulaw", decode_ulaw), ("alaw", decode_alaw)])
async def test_g711_output_is_8khz_and_decodes_to_the_audio(fake_server, law, decode):
    """mulaw/alaw: one byte per 8 kHz sample; decoding gives back the resampled audio within G.711's error."""
    async with CsmClient(fake_server.ws) as client:
        result = await client.synthesize(TEXT, format=law, chunk_ms=20)
    assert result.done["format"] == law and result.done["sample_rate"] == 8000
    assert all(s == 160 for s in result.chunk_sizes[:-1])
    got = decode(np.frombuffer(result.pcm, dtype=np.uint8)).astype(np.float64) / 32768
    expected = soxr.resample(engine_audio(fake_server.engine, TEXT), 24000, 8000, quality="HQ")
    n = min(len(got), len(expected))
    assert np.max(np.abs(got[:n] - expected[:n])) < 0.02  # 8-bit companding


@pytest.mark.parametrize(
    "options, width",
    [({"sample_rate": 8000}, 2), ({"sample_rate": 16000}, 2), ({"format": "mulaw"}, 1), ({"format": "alaw"}, 1)],
)
async def test_done_counts_the_samples_received_at_the_output_rate(fake_server, options, width):
    """done.samples is what the client received at its sample_rate (a G.711 byte is a sample), not 24 kHz
    samples: the received bytes over the sample width, and audio_ms of them at that rate."""
    async with websockets.connect(fake_server.ws) as ws:
        await ws.send(json.dumps({"text": TEXT, **options}))
        frames, done = await collect(ws)
    received = sum(len(f) for f in frames) // width
    assert done["samples"] == received
    assert done["samples"] == pytest.approx(done["audio_ms"] * done["sample_rate"] / 1000, abs=1)


async def test_done_of_framed_and_streamed_audio_counts_samples_at_the_output_rate(fake_server):
    """Twilio media messages (8 kHz µ-law) and a text stream at 16 kHz: done.samples counts the samples sent."""
    async with websockets.connect(fake_server.ws) as ws:
        await ws.send(json.dumps({"text": TEXT, "framing": "twilio", "stream_sid": "MZ1"}))
        frames, framed = await collect(ws)
        await ws.send(json.dumps({"type": "text", "context_id": "s", "text": TEXT + " And more.", "sample_rate": 16000}))
        await ws.send(json.dumps({"type": "end", "context_id": "s"}))
        pcm, streamed = await collect(ws)
    payload = sum(len(base64.b64decode(f["media"]["payload"])) for f in frames if f["event"] == "media")
    assert framed["samples"] == payload and framed["sample_rate"] == 8000
    assert streamed["samples"] == sum(len(p) for p in pcm) // 2 and streamed["sample_rate"] == 16000
    assert streamed["samples"] == pytest.approx(streamed["audio_ms"] * 16, abs=1)


async def test_g711_at_another_rate_is_refused(fake_server):
    """mulaw is only offered at 8000 Hz; the error says so."""
    async with websockets.connect(fake_server.ws) as ws:
        await ws.send(json.dumps({"text": "Hi", "format": "mulaw", "sample_rate": 16000}))
        event = json.loads(await ws.recv())
    assert event["error"]["message"] == "mulaw is only available at 8000 Hz"


async def test_twilio_framing_sends_media_messages_then_a_mark(fake_server):
    """framing=twilio: Twilio media messages of whole 20 ms µ-law frames with the streamSid, then a mark, then done."""
    async with websockets.connect(fake_server.ws) as ws:
        await ws.send(json.dumps({"text": TEXT, "framing": "twilio", "stream_sid": "MZ123", "request_id": "r1"}))
        frames, done = await collect(ws)
    assert all(isinstance(f, dict) for f in frames)
    media, mark = frames[:-1], frames[-1]
    assert mark == {"event": "mark", "streamSid": "MZ123", "mark": {"name": "r1"}}
    assert all(m["event"] == "media" and m["streamSid"] == "MZ123" and set(m) == {"event", "streamSid", "media"} for m in media)
    payload = b"".join(base64.b64decode(m["media"]["payload"]) for m in media)
    assert all(len(base64.b64decode(m["media"]["payload"])) == 160 for m in media)
    expected = encode_ulaw(float_to_pcm16(soxr.resample(engine_audio(fake_server.engine, TEXT), 24000, 8000, quality="HQ")))
    assert len(payload) >= len(expected) - 8
    decoded = decode_ulaw(np.frombuffer(payload, dtype=np.uint8))[: len(expected)].astype(int)
    assert np.max(np.abs(decoded - decode_ulaw(expected).astype(int))) <= 400
    assert done["done"] is True and done["request_id"] == "r1"


async def test_telnyx_framing_sends_payload_only_media_messages(fake_server):
    """framing=telnyx: {"event": "media", "media": {"payload"}} messages and a final mark."""
    async with websockets.connect(fake_server.ws) as ws:
        await ws.send(json.dumps({"text": TEXT, "framing": "telnyx", "request_id": "t"}))
        frames, done = await collect(ws)
    assert frames[-1] == {"event": "mark", "mark": {"name": "t"}}
    assert all(set(m) == {"event", "media"} and len(base64.b64decode(m["media"]["payload"])) == 160 for m in frames[:-1])


async def test_twilio_framing_without_stream_sid_is_refused(fake_server):
    """Twilio needs the call's streamSid to accept media."""
    async with websockets.connect(fake_server.ws) as ws:
        await ws.send(json.dumps({"text": "Hi", "framing": "twilio"}))
        event = json.loads(await ws.recv())
    assert "stream_sid" in event["error"]["message"]


async def test_streamed_text_starts_speaking_at_the_first_sentence_boundary(settings_factory):
    """Audio for the first sentence arrives while the LLM is still writing; one done ends the stream."""
    engine = FakeEngine()
    with running_server(settings_factory(engine="fake"), engine) as server:
        async with websockets.connect(server.ws) as ws:
            for token in ["Sure, ", "let me ", "check that. ", "It will ", "take a"]:
                await ws.send(json.dumps({"type": "text", "context_id": "c1", "text": token}))
            first = await asyncio.wait_for(ws.recv(), 5)
            assert isinstance(first, bytes)  # speaking before "end"
            await ws.send(json.dumps({"type": "text", "context_id": "c1", "text": " moment."}))
            await ws.send(json.dumps({"type": "end", "context_id": "c1"}))
            frames, done = await collect(ws)
    pcm = first + b"".join(frames)
    assert done["context_id"] == "c1" and done["request_id"] == "c1"
    # One continuous stream: the tone's phase carries on from sentence to sentence.
    s1 = SynthesisRequest("Sure, let me check that.", max_audio_ms=90_000, request_id="c1")
    s2 = SynthesisRequest("It will take a moment.", max_audio_ms=90_000, request_id="c1")
    expected = np.concatenate([engine.render(s1), engine.render(s2, start_frame=engine.num_frames(s1))])
    assert pcm == float_to_pcm16(expected).tobytes()
    assert done["samples"] == len(expected)


async def test_flush_speaks_what_is_buffered_without_a_sentence_end(fake_server):
    """flush makes the server speak text that has no sentence boundary yet."""
    async with websockets.connect(fake_server.ws) as ws:
        await ws.send(json.dumps({"type": "text", "context_id": "x", "text": "no punctuation here"}))
        await ws.send(json.dumps({"type": "flush", "context_id": "x"}))
        assert isinstance(await asyncio.wait_for(ws.recv(), 5), bytes)
        await ws.send(json.dumps({"type": "end", "context_id": "x"}))
        _, done = await collect(ws)
    assert done["context_id"] == "x" and "error" not in done


async def test_cancel_of_a_text_stream_drops_its_queued_sentences(settings_factory):
    """Cancelling a context stops the current sentence and the ones queued behind it."""
    engine = FakeEngine(frame_delay_s=0.05)
    with running_server(settings_factory(engine="fake"), engine) as server:
        async with websockets.connect(server.ws) as ws:
            text = " ".join(f"Sentence number {i} is here." for i in range(6)) + " And"
            await ws.send(json.dumps({"type": "text", "context_id": "c", "text": text}))
            assert isinstance(await asyncio.wait_for(ws.recv(), 5), bytes)
            await ws.send(json.dumps({"type": "cancel", "context_id": "c"}))
            _, done = await collect(ws)
            assert done == {"done": True, "request_id": "c", "context_id": "c", "cancelled": True}
            await asyncio.sleep(0.3)
            made = engine.frames_made["c"]
            await asyncio.sleep(0.3)
            assert engine.frames_made["c"] == made  # nothing more is generated for it
            await ws.send(json.dumps({"text": "Still usable."}))
            _, done = await collect(ws)
            assert "error" not in done


async def test_flush_of_an_unknown_context_is_an_error(fake_server):
    """flush/end name a context that exists."""
    async with websockets.connect(fake_server.ws) as ws:
        await ws.send(json.dumps({"type": "end", "context_id": "nope"}))
        event = json.loads(await ws.recv())
    assert event["error"]["code"] == "invalid_request"
