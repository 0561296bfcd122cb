"""LiveKit Agents' ElevenLabs TTS plugin, speaking through csmserve by its base URL alone.

A test has no LiveKit job context (whose http_context gives the plugin its aiohttp session), so each test
passes its own session; the plugin reaches nothing but the loopback server."""

from __future__ import annotations

import asyncio

import aiohttp
import httpx
from livekit.plugins import elevenlabs

from csmserve.engine import SynthesisRequest
from csmserve.engine.fake import FakeEngine
from support.routes import counter
from support.servers import running_server
from test_elevenlabs_ws import ws_generate_audio

FIRST_TURN = "Hello there. How are you today?"
SECOND_TURN = [
    f"Sentence number {n} is here." for n in ("one", "two", "three", "four", "five", "six", "seven", "eight")
]


def livekit_tts(server, session: aiohttp.ClientSession, **options) -> elevenlabs.TTS:
    """The plugin as the README configures it, pointed at ``server``."""
    return elevenlabs.TTS(
        base_url=f"{server.http}/v1", voice_id="0", api_key="unused", encoding="pcm_24000",
        http_session=session, **options,
    )  # fmt: skip


async def speak_words(tts: elevenlabs.TTS, text: str) -> list:
    """One turn through ``tts.stream()``: ``text`` pushed word by word, flushed, ended; every audio event."""
    async with tts.stream() as stream:
        for word in text.split():
            stream.push_text(word + " ")
        stream.flush()
        stream.end_input()
        return [event async for event in stream]


def pcm_of(events: list) -> bytes:
    """The audio of ``events``, less the 10 ms silent marker LiveKit adds at a segment's end when no
    audio is left to mark final."""
    frames = [e.frame for e in events]
    last = frames[-1]
    if events[-1].is_final and last.samples_per_channel == last.sample_rate // 100 and not any(last.data):
        frames.pop()
    return b"".join(bytes(f.data) for f in frames)


async def metric_reaches(server, **labels) -> str:
    """Poll /metrics, without blocking the loop the plugin runs on, until ``csm_requests_total`` with
    ``labels`` counts one; the metrics text then."""
    async with httpx.AsyncClient() as client:
        for _ in range(200):
            text = (await client.get(server.http + "/metrics")).text
            if counter(text, "csm_requests_total", **labels) >= 1:
                return text
            await asyncio.sleep(0.05)
    raise AssertionError(f"csm_requests_total{labels} never counted")


def samples_of(sentences: list[str], engine: FakeEngine) -> int:
    return sum(len(engine.render(SynthesisRequest(s, max_audio_ms=90_000))) for s in sentences)


async def test_livekit_stream_speaks_a_turn_as_ws_generate_does(fake_server):
    """Words pushed into tts.stream() (auto mode, a sentence per flush): 24 kHz mono frames whose PCM is
    /ws/generate's for the same text and seed, one request id, the last frame final."""
    async with aiohttp.ClientSession() as session:
        tts = livekit_tts(fake_server, session)
        events = await speak_words(tts, FIRST_TURN)
        await tts.aclose()
    assert {(e.frame.sample_rate, e.frame.num_channels) for e in events} == {(24000, 1)}
    pcm = pcm_of(events)
    assert len(pcm) == 2 * samples_of(["Hello there.", "How are you today?"], fake_server.engine)
    assert pcm == await ws_generate_audio(fake_server, FIRST_TURN, seed=0)
    assert len({e.request_id for e in events}) == 1 and events[-1].is_final


async def test_livekit_second_turn_closed_mid_way_stops_generation(settings_factory):
    """Streamed words (a chunk_length_schedule, so no flush per sentence): turn one is spoken whole; turn
    two's stream closed after its first audio is a barge-in: the server stops generating it."""
    engine = FakeEngine(frame_delay_s=0.02)
    with running_server(settings_factory(engine="fake"), engine) as server:
        async with aiohttp.ClientSession() as session:
            tts = livekit_tts(server, session, chunk_length_schedule=[50])
            first = await speak_words(tts, FIRST_TURN)
            stream = tts.stream()
            for sentence in SECOND_TURN:
                stream.push_text(sentence + " ")
            audio = await asyncio.wait_for(anext(aiter(stream)), 10)
            await stream.aclose()
            metrics = await metric_reaches(server, endpoint="elevenlabs", outcome="cancelled")
            second_id = audio.request_id
            made = engine.frames_made[second_id]
            await asyncio.sleep(0.3)
            assert engine.frames_made[second_id] == made  # nothing more generated after the barge-in
            await tts.aclose()
        assert pcm_of(first) == await ws_generate_audio(server, FIRST_TURN, seed=0)
    total = sum(engine.num_frames(SynthesisRequest(s, max_audio_ms=90_000)) for s in SECOND_TURN)
    assert made < total / 2 and second_id != first[0].request_id
    assert counter(metrics, "csm_requests_total", endpoint="elevenlabs", outcome="ok") == 1
    assert counter(metrics, "csm_requests_total", endpoint="elevenlabs", outcome="cancelled") == 1


async def test_livekit_auto_mode_stream_closed_mid_way_finishes_only_what_it_flushed(settings_factory):
    """Auto mode flushes each sentence, so closing its stream mid-turn is ElevenLabs' close after flush: the
    sentences already sent are spoken whole (the context ends ok), the one not yet sent is not."""
    engine = FakeEngine(frame_delay_s=0.01)
    with running_server(settings_factory(engine="fake"), engine) as server:
        async with aiohttp.ClientSession() as session:
            tts = livekit_tts(server, session)
            stream = tts.stream()
            for sentence in SECOND_TURN:
                stream.push_text(sentence + " ")
            audio = await asyncio.wait_for(anext(aiter(stream)), 10)
            await stream.aclose()
            await metric_reaches(server, endpoint="elevenlabs", outcome="ok")
            await tts.aclose()
    made = engine.frames_made[audio.request_id]
    frames = [engine.num_frames(SynthesisRequest(s, max_audio_ms=90_000)) for s in SECOND_TURN]
    # Whole sentences only, and never the last: the plugin's tokenizer holds it until more text or the end.
    assert made in [sum(frames[:k]) for k in range(1, len(frames))]


async def test_livekit_synthesize_returns_the_whole_utterance(fake_server):
    """tts.synthesize(text) over the HTTP stream route: 24 kHz mono frames whose PCM is the route's audio."""
    async with aiohttp.ClientSession() as session:
        tts = livekit_tts(fake_server, session)
        events = [e async for e in tts.synthesize("Hello from CSM.")]
        await tts.aclose()
    assert {(e.frame.sample_rate, e.frame.num_channels) for e in events} == {(24000, 1)}
    pcm = pcm_of(events)
    assert len(pcm) == 2 * samples_of(["Hello from CSM."], fake_server.engine)
    reference = httpx.post(
        fake_server.http + "/v1/text-to-speech/0?output_format=pcm_24000", json={"text": "Hello from CSM."}
    )
    assert pcm == reference.content
