"""The README and the docs pages' examples run as written against a live server.

Each example is found on the page that shows it (an example moved to another page must move here too, or its
test fails to find it); only the server's address is replaced. The Configuration page is generated from the
settings model, so it is checked by the docs site's build (test_docs_site.py), not here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import wave
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SEED_CLIENTS = ROOT / "docs" / "api" / "seed" / "clients.md"
OPENAI = ROOT / "docs" / "api" / "openai.md"
ELEVENLABS = ROOT / "docs" / "api" / "elevenlabs.md"
TROUBLESHOOTING = ROOT / "docs" / "troubleshooting.md"


def blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", page.read_text(), flags=re.S)


def checkout_env(**extra: str) -> dict:
    """The environment for an example run in a scratch folder: this checkout's ``src`` first (a relative
    PYTHONPATH would not survive the change of folder), no ``CSM_*`` settings but ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CSM_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    return {**env, **extra}


def python_block(page: Path, marker: str) -> str:
    """The one Python example on ``page`` that contains ``marker``."""
    [block] = [b for b in blocks(page, "python") if marker in b]
    return block


def test_seed_websocket_client_runs_as_written(fake_server, tmp_path):
    """The 20-line client, pointed at a live server, writes a WAV and prints done."""
    script = python_block(SEED_CLIENTS, "websockets.connect(url) as ws").replace("ws://127.0.0.1:8000/ws/generate", fake_server.ws)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=checkout_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "'done': True" in result.stdout
    with wave.open(str(tmp_path / "hello.wav")) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (24000, 1, 2)
        assert wav.getnframes() > 0


def test_csmclient_example_runs_as_written(fake_server, tmp_path):
    """The csmserve.client example streams chunks and prints done."""
    script = python_block(SEED_CLIENTS, "CsmClient").replace("ws://127.0.0.1:8000/ws/generate", fake_server.ws)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=checkout_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "bytes of PCM" in result.stdout and "'done': True" in result.stdout


def test_openai_sdk_example_runs_as_written(fake_server, tmp_path):
    """The openai client example streams an mp3 to a file."""
    script = python_block(OPENAI, "from openai import OpenAI").replace("http://127.0.0.1:8000/v1", fake_server.http + "/v1")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=checkout_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "hello.mp3").stat().st_size > 1000


def test_twilio_bridge_forwards_exactly_twilio_messages(fake_server):
    """The bridge sketch forwards media messages and the mark, and stops at done."""
    import asyncio

    block = python_block(SEED_CLIENTS, "async def speak")
    namespace: dict = {}
    exec(block, namespace)

    class FakeTwilio:
        def __init__(self):
            self.sent = []

        async def send(self, message):
            self.sent.append(json.loads(message))

    twilio = FakeTwilio()
    asyncio.run(namespace["speak"](twilio, "MZabc", "Hello caller.", url=fake_server.ws))
    assert twilio.sent[-1]["event"] == "mark"
    assert all(m["streamSid"] == "MZabc" for m in twilio.sent)
    assert {m["event"] for m in twilio.sent[:-1]} == {"media"}


def test_elevenlabs_sdk_example_runs_as_written(fake_server, tmp_path):
    """The ElevenLabs SDK example, pointed at csmserve, writes the utterance as 24 kHz PCM."""
    script = python_block(ELEVENLABS, "from elevenlabs.client import ElevenLabs").replace("http://127.0.0.1:8000", fake_server.http)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=checkout_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    from csmserve.engine import SynthesisRequest

    samples = len(fake_server.engine.render(SynthesisRequest("Hello from CSM.", max_audio_ms=90_000)))
    assert (tmp_path / "hello.pcm").stat().st_size == 2 * samples


def test_elevenlabs_voices_example_runs_as_written(fake_server, tmp_path):
    """The voices example clones a voice from anna.wav with its transcript, speaks in it, finds it by
    search, shows a speaker and deletes the clone."""
    from test_voices_and_context import clip

    (tmp_path / "anna.wav").write_bytes(clip("WAV"))
    script = python_block(ELEVENLABS, "voices.ivc.create(").replace("http://127.0.0.1:8000", fake_server.http)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=checkout_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "['anna'] CSM speaker 3" in result.stdout
    assert httpx.get(fake_server.http + "/v1/voices").json()["data"] == []


def test_pipecat_example_speaks_through_csmserve(fake_server):
    """The pipecat snippet's service, in a pipeline, speaks a turn through csmserve's URL."""
    import asyncio

    from pipecat.frames.frames import TTSAudioRawFrame, TTSStoppedFrame
    from test_elevenlabs_pipecat import speak_one_turn

    block = python_block(ELEVENLABS, "ElevenLabsTTSService(")
    namespace: dict = {}
    exec(block.replace("ws://127.0.0.1:8000", f"ws://127.0.0.1:{fake_server.port}"), namespace)
    frames = asyncio.run(speak_one_turn(namespace["tts"], ["Hello from the README. "]))
    assert sum(len(f.audio) for f in frames if isinstance(f, TTSAudioRawFrame)) > 0
    assert any(isinstance(f, TTSStoppedFrame) for f in frames)


def test_livekit_example_speaks_through_csmserve(fake_server):
    """The LiveKit snippet's TTS, in an http context as a LiveKit job gives it, streams a turn through
    csmserve's URL: 24 kHz PCM equal to /ws/generate's for the text."""
    import asyncio

    from livekit.agents.utils import http_context
    from test_elevenlabs_livekit import pcm_of, speak_words
    from test_elevenlabs_ws import ws_generate_audio

    block = python_block(ELEVENLABS, "livekit.plugins")
    text = "Hello from the README."

    async def speak() -> list:
        async with http_context.open():  # what a LiveKit job provides: the plugin's aiohttp session
            namespace: dict = {}
            exec(block.replace("http://127.0.0.1:8000", fake_server.http), namespace)
            events = await speak_words(namespace["tts"], text)
            await namespace["tts"].aclose()
        return events

    events = asyncio.run(speak())
    assert {(e.frame.sample_rate, e.frame.num_channels) for e in events} == {(24000, 1)}
    assert pcm_of(events) == asyncio.run(ws_generate_audio(fake_server, text, seed=0))


def test_readme_port_example_reaches_the_server_on_that_port(fake_server, tmp_path):
    """The README's `CSM_PORT=... csmserve say` line, with a live server's port, reaches that server, writes the
    WAV and names the server that answered."""
    [line] = [
        line
        for block in blocks(README, "sh")
        for line in block.splitlines()
        if re.match(r"CSM_PORT=\d+ \.venv/bin/csmserve say ", line)
    ]
    assignment, program, *arguments = shlex.split(line, comments=True)
    assert assignment.startswith("CSM_PORT=") and program == ".venv/bin/csmserve"
    result = subprocess.run(
        [sys.executable, "-m", "csmserve", *arguments],
        cwd=tmp_path, env=checkout_env(CSM_PORT=str(fake_server.port)), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"server: ws://127.0.0.1:{fake_server.port}/ws/generate" in result.stdout
    output = arguments[arguments.index("-o") + 1]
    with wave.open(str(tmp_path / output)) as wav:
        assert wav.getnframes() > 0


def test_pipecat_http_service_with_a_raised_timeout_speaks_through_csmserve(fake_server):
    """The troubleshooting page's pipecat HTTP service (its stop_frame_timeout_s raised) speaks a turn through
    csmserve's URL."""
    import asyncio

    import aiohttp
    from pipecat.frames.frames import TTSAudioRawFrame, TTSStoppedFrame
    from test_elevenlabs_pipecat import speak_one_turn

    block = python_block(TROUBLESHOOTING, "ElevenLabsHttpTTSService(")
    namespace: dict = {}
    exec(block.replace("http://127.0.0.1:8000", fake_server.http), namespace)

    async def speak() -> list:
        async with aiohttp.ClientSession() as session:
            tts = await namespace["make_tts"](session)
            return await speak_one_turn(tts, ["Hello from the troubleshooting page. "])

    frames = asyncio.run(speak())
    assert sum(len(f.audio) for f in frames if isinstance(f, TTSAudioRawFrame)) > 0
    assert any(isinstance(f, TTSStoppedFrame) for f in frames)
