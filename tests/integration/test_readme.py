"""The README is the front door: its client example runs as written and its table lists every setting."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import wave
from pathlib import Path

from csmserve.config import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_websocket_client_runs_as_written(fake_server, tmp_path):
    """The 20-line client, pointed at a live server, writes a WAV and prints done."""
    block = next(b for b in python_blocks() if "websockets.connect" in b)
    script = block.replace("ws://127.0.0.1:8000/ws/generate", fake_server.ws)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "'done': True" in result.stdout
    with wave.open(str(tmp_path / "hello.wav")) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (24000, 1, 2)
        assert wav.getnframes() > 0


def test_readme_csmclient_example_runs_as_written(fake_server, tmp_path):
    """The csmserve.client example streams chunks and prints done."""
    block = next(b for b in python_blocks() if "CsmClient" in b)
    script = block.replace("ws://127.0.0.1:8000/ws/generate", fake_server.ws)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "bytes of PCM" in result.stdout and "'done': True" in result.stdout


def test_readme_openai_example_runs_as_written(fake_server, tmp_path):
    """The openai client example streams an mp3 to a file."""
    block = next(b for b in python_blocks() if "from openai import OpenAI" in b)
    script = block.replace("http://127.0.0.1:8000/v1", fake_server.http + "/v1")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "hello.mp3").stat().st_size > 1000


def test_readme_twilio_bridge_forwards_exactly_twilio_messages(fake_server):
    """The bridge sketch forwards media messages and the mark, and stops at done."""
    import asyncio

    block = next(b for b in python_blocks() if "async def speak" in b)
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


def test_readme_configuration_table_lists_every_setting():
    """Each Settings field has its CSM_* row in the README."""
    text = README.read_text()
    for name in Settings.model_fields:
        assert f"| `CSM_{name.upper()}` |" in text, name


def test_readme_elevenlabs_sdk_example_runs_as_written(fake_server, tmp_path):
    """The ElevenLabs SDK example, pointed at csmserve, writes the utterance as 24 kHz PCM."""
    block = next(b for b in python_blocks() if "from elevenlabs.client import ElevenLabs" in b)
    script = block.replace("http://127.0.0.1:8000", fake_server.http)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    from csmserve.engine import SynthesisRequest

    samples = len(fake_server.engine.render(SynthesisRequest("Hello from CSM.", max_audio_ms=90_000)))
    assert (tmp_path / "hello.pcm").stat().st_size == 2 * samples


def test_readme_pipecat_example_speaks_through_csmserve(fake_server):
    """The pipecat snippet's service, in a pipeline, speaks a turn through csmserve's URL."""
    import asyncio

    from pipecat.frames.frames import TTSAudioRawFrame, TTSStoppedFrame
    from test_elevenlabs_pipecat import speak_one_turn

    block = next(b for b in python_blocks() if "ElevenLabsTTSService(" in b)
    namespace: dict = {}
    exec(block.replace("ws://127.0.0.1:8000", f"ws://127.0.0.1:{fake_server.port}"), namespace)
    frames = asyncio.run(speak_one_turn(namespace["tts"], ["Hello from the README. "]))
    assert sum(len(f.audio) for f in frames if isinstance(f, TTSAudioRawFrame)) > 0
    assert any(isinstance(f, TTSStoppedFrame) for f in frames)


def test_readme_livekit_example_speaks_through_csmserve(fake_server):
    """The LiveKit snippet's TTS, in an http context as a LiveKit job gives it, streams a turn through
    csmserve's URL: 24 kHz PCM equal to /ws/generate's for the text."""
    import asyncio

    from livekit.agents.utils import http_context
    from test_elevenlabs_livekit import pcm_of, speak_words
    from test_elevenlabs_ws import ws_generate_audio

    block = next(b for b in python_blocks() if "livekit.plugins" in b)
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
