"""Wyoming (Home Assistant) through the `wyoming` package's own client, against a real server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import soundfile as sf
import websockets
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped, SynthesizeVoice

from csmserve.audio.pcm import float_to_pcm16
from csmserve.engine import SynthesisRequest
from csmserve.engine.fake import FakeEngine
from csmserve.text.sentences import split_sentences
from support.processes import free_port
from support.servers import running_server

TEXT = "Hello there, this is a test of the Wyoming port."


@contextlib.contextmanager
def wyoming_server(settings_factory, engine: FakeEngine | None = None, **settings):
    """A server with the fake engine and its Wyoming port on a free loopback port: (server, port)."""
    engine = engine or FakeEngine()
    with running_server(settings_factory(engine="fake", wyoming_port=0, **settings), engine) as server:
        server.wait_ready()
        yield server, server.app.state.wyoming.port


def rendered(engine: FakeEngine, text: str, speaker_id: int = 0, start_frame: int = 0) -> np.ndarray:
    """What the fake engine makes of ``text`` (float32 at 24 kHz), as a client must receive it."""
    return engine.render(SynthesisRequest(text=text, speaker_id=speaker_id, max_audio_ms=90_000), start_frame)


async def read_until(client: AsyncTcpClient, last: str) -> list:
    """Every event up to and including the first of type ``last`` (or ``error``), or up to the socket's end."""
    events = []
    while True:
        event = await asyncio.wait_for(client.read_event(), 30)
        if event is None:
            return events
        events.append(event)
        if event.type in (last, "error"):
            return events


def pcm_of(events: list) -> bytes:
    return b"".join(AudioChunk.from_event(e).audio for e in events if AudioChunk.is_type(e.type))


def wav_clip(seconds: float = 1.5, rate: int = 24000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buffer = io.BytesIO()
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


async def test_describe_lists_the_speaker_ids_and_the_registered_voices(settings_factory):
    """info: one streaming TTS program whose voices are speakers "0"-"9" and each registered voice (its id
    as the name, its own name as the description), all English."""
    with wyoming_server(settings_factory) as (server, port):
        response = httpx.post(
            server.http + "/v1/voices", files={"audio": ("ref.wav", wav_clip(), "audio/wav")},
            data={"name": "narrator", "transcript": "This is how I sound.", "speaker_id": "3"}, timeout=60,
        )
        assert response.status_code == 201, response.text
        voice = response.json()
        async with AsyncTcpClient("127.0.0.1", port) as client:
            await client.write_event(Describe().event())
            info = Info.from_event(await asyncio.wait_for(client.read_event(), 10))
    [program] = info.tts
    assert program.installed and program.supports_synthesize_streaming
    assert [v.name for v in program.voices] == [str(i) for i in range(10)] + [voice["id"]]
    assert program.voices[-1].description == "narrator"
    assert all(v.languages == ["en"] and v.installed for v in program.voices)


async def test_synthesize_streams_the_engines_audio_for_the_sentence(settings_factory):
    """synthesize: audio-start (24 kHz, 16-bit, mono), the engine's audio sample for sample in chunks sent as
    it is generated, audio-stop."""
    with wyoming_server(settings_factory) as (server, port):
        async with AsyncTcpClient("127.0.0.1", port) as client:
            await client.write_event(Synthesize(text=TEXT, voice=SynthesizeVoice(name="3")).event())
            events = await read_until(client, AudioStop().event().type)
        expected = float_to_pcm16(rendered(server.engine, TEXT, speaker_id=3)).tobytes()
    start = AudioStart.from_event(events[0])
    assert (start.rate, start.width, start.channels) == (24000, 2, 1)
    assert AudioStop.is_type(events[-1].type)
    chunks = [AudioChunk.from_event(e) for e in events[1:-1]]
    assert len(chunks) == len(expected) // 3840  # one chunk per 80 ms frame, as the engine makes them
    assert all((c.rate, c.width, c.channels) == (24000, 2, 1) for c in chunks)
    assert pcm_of(events) == expected


async def test_a_registered_voice_speaks_with_its_own_speaker(settings_factory):
    """A registered voice named by its id (as info lists it) or by its name speaks with its speaker id."""
    with wyoming_server(settings_factory) as (server, port):
        voice = httpx.post(
            server.http + "/v1/voices", files={"audio": ("ref.wav", wav_clip(), "audio/wav")},
            data={"name": "narrator", "transcript": "This is how I sound.", "speaker_id": "5"}, timeout=60,
        ).json()
        received = []
        for name in (voice["id"], "narrator"):
            async with AsyncTcpClient("127.0.0.1", port) as client:
                await client.write_event(Synthesize(text=TEXT, voice=SynthesizeVoice(name=name)).event())
                received.append(pcm_of(await read_until(client, "audio-stop")))
        expected = float_to_pcm16(rendered(server.engine, TEXT, speaker_id=5)).tobytes()
    assert received == [expected, expected]


async def test_streamed_synthesis_of_three_chunks_is_one_audio_stream(settings_factory):
    """synthesize-start, three synthesize-chunks, Home Assistant's copy of the whole text as synthesize (ignored),
    synthesize-stop: one audio-start, the sentences' audio as one continuous stream, audio-stop, synthesize-stopped."""
    parts = ["Sure, let me check", " that for you. It will take a", " moment."]
    with wyoming_server(settings_factory) as (server, port):
        async with AsyncTcpClient("127.0.0.1", port) as client:
            await client.write_event(SynthesizeStart(voice=SynthesizeVoice(name="2")).event())
            for part in parts:
                await client.write_event(SynthesizeChunk(text=part).event())
            await client.write_event(Synthesize(text="".join(parts), voice=SynthesizeVoice(name="2")).event())
            await client.write_event(SynthesizeStop().event())
            events = await read_until(client, SynthesizeStopped().event().type)
        engine = server.engine
        sentences = split_sentences("".join(parts))
        audio, frames = [], 0
        for sentence in sentences:  # each sentence continues the tone where the last one stopped
            audio.append(rendered(engine, sentence, speaker_id=2, start_frame=frames))
            frames += engine.num_frames(SynthesisRequest(text=sentence, speaker_id=2, max_audio_ms=90_000))
    assert len(sentences) == 2
    kinds = [e.type for e in events]
    assert kinds[0] == "audio-start" and kinds[-2:] == ["audio-stop", "synthesize-stopped"]
    assert set(kinds[1:-2]) == {"audio-chunk"}
    assert pcm_of(events) == float_to_pcm16(np.concatenate(audio)).tobytes()


async def test_an_unknown_voice_gets_wyomings_error_event_then_the_connection_closes(settings_factory):
    """A voice that info does not list: Wyoming's error (code invalid_request, naming the voice), then the end of the
    connection, so a client waiting for audio stops waiting."""
    with wyoming_server(settings_factory) as (server, port):
        async with AsyncTcpClient("127.0.0.1", port) as client:
            await client.write_event(Synthesize(text=TEXT, voice=SynthesizeVoice(name="nobody")).event())
            first = await asyncio.wait_for(client.read_event(), 10)
            after = await asyncio.wait_for(client.read_event(), 10)
    error = Error.from_event(first)
    assert error.code == "invalid_request" and "unknown voice 'nobody'" in error.text
    assert after is None
    assert server.engine.frames_made == {}


async def test_disconnect_mid_stream_cancels_generation(settings_factory):
    """A client that leaves after its first chunk stops its generation within a frame or two: the engine makes
    a few frames of the hundred the text would take, and the request counts as disconnected."""
    engine = FakeEngine(frame_delay_s=0.03)
    text = "A long answer that would take a long time to speak out loud. " * 7
    total = engine.num_frames(SynthesisRequest(text=text, max_audio_ms=90_000))
    with wyoming_server(settings_factory, engine) as (server, port):
        async with AsyncTcpClient("127.0.0.1", port) as client:
            await client.write_event(Synthesize(text=text).event())
            events = await read_until(client, "audio-chunk")
        received = len([e for e in events if AudioChunk.is_type(e.type)])
        deadline = time.monotonic() + 10
        while engine.capacity().active and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert engine.capacity().active == 0
        [made] = engine.frames_made.values()
        metrics = httpx.get(server.http + "/metrics").text
    assert received == 1 and total > 100
    assert made <= received + 3
    assert 'csm_requests_total{endpoint="wyoming",outcome="disconnected"} 1.0' in metrics


async def test_a_full_server_answers_overloaded(settings_factory):
    """With every stream slot taken, a synthesize gets Wyoming's error with code overloaded."""
    engine = FakeEngine(frame_delay_s=0.03)
    with wyoming_server(settings_factory, engine, max_streams=1) as (server, port):
        async with AsyncTcpClient("127.0.0.1", port) as busy, AsyncTcpClient("127.0.0.1", port) as late:
            await busy.write_event(Synthesize(text=TEXT * 4).event())
            await read_until(busy, "audio-chunk")
            await late.write_event(Synthesize(text=TEXT).event())
            [event] = await read_until(late, "audio-stop")
    assert Error.from_event(event).code == "overloaded"


async def test_wyoming_and_websocket_requests_share_the_engines_batch(settings_factory):
    """A Wyoming request and a /ws/generate request at once are decoded in the same engine steps."""
    engine = FakeEngine(frame_delay_s=0.02)
    with wyoming_server(settings_factory, engine) as (server, port):
        async with AsyncTcpClient("127.0.0.1", port) as client, websockets.connect(server.ws) as ws:
            await client.write_event(Synthesize(text=TEXT * 2).event())
            await ws.send('{"text": "%s"}' % (TEXT * 2))
            wyoming_events, _ = await asyncio.gather(read_until(client, "audio-stop"), ws.recv())
    assert AudioStop.is_type(wyoming_events[-1].type)
    assert max(engine.batch_sizes) == 2


def test_csmserve_wyoming_serves_alone_and_stops_on_sigterm(tmp_path):
    """`csmserve wyoming`: the Wyoming port without HTTP, on the engine serve would load; SIGTERM ends it (exit 0)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CSM_")}
    env.update(CSM_VOICES_DIR=str(tmp_path / "voices"), CSM_AUDIO_DIR=str(tmp_path / "audio"))
    log_path = tmp_path / "wyoming.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "csmserve", "wyoming", "--engine", "fake", "--wyoming-port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while "ready: tcp://127.0.0.1" not in log_path.read_text():
                assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)

            async def speak():
                async with AsyncTcpClient("127.0.0.1", port) as client:
                    await client.write_event(Synthesize(text=TEXT).event())
                    return await read_until(client, "audio-stop")

            events = asyncio.run(speak())
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
    assert pcm_of(events) == float_to_pcm16(rendered(FakeEngine(), TEXT)).tobytes()
    assert "wyoming: listening on tcp://127.0.0.1:" in log_path.read_text()



async def test_a_connection_with_nothing_to_do_is_closed_after_the_idle_timeout(settings_factory):
    """After its audio, a connection that sends nothing more for idle_timeout_s is closed by the server;
    one still generating is not (its audio arrives whole)."""
    engine = FakeEngine(frame_delay_s=0.02)
    with wyoming_server(settings_factory, engine, idle_timeout_s=0.3) as (server, port):
        async with AsyncTcpClient("127.0.0.1", port) as client:
            await client.write_event(Synthesize(text=TEXT * 2).event())
            events = await read_until(client, "audio-stop")
            after = await asyncio.wait_for(client.read_event(), 10)
    assert pcm_of(events) == float_to_pcm16(rendered(engine, TEXT * 2)).tobytes()
    assert after is None


async def test_requests_queued_past_the_per_connection_limit_are_refused(settings_factory):
    """Synthesize events pipelined on one connection: max_pending_per_connection of them wait their turn,
    the next one is refused with an error (after the audio of those before it), then the connection closes."""
    engine = FakeEngine(frame_delay_s=0.01)
    with wyoming_server(settings_factory, engine, max_pending_per_connection=2) as (server, port):
        async with AsyncTcpClient("127.0.0.1", port) as client:
            await client.write_event(Synthesize(text=TEXT).event())
            events = await read_until(client, "audio-chunk")  # the first one runs
            for _ in range(3):  # two wait, the third is one too many
                await client.write_event(Synthesize(text=TEXT).event())
            while (event := await asyncio.wait_for(client.read_event(), 10)) is not None:
                events.append(event)
    kinds = [e.type for e in events]
    assert kinds.count("audio-stop") == 3 and kinds[-1] == "error"
    assert "2 requests are already queued" in Error.from_event(events[-1]).text
