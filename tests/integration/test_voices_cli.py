"""Stable voices end to end: `csmserve voices` manages the directory a running server uses, the server's
default voice and voice map apply on every API, and a request without a voice is logged as varying."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import httpx
import numpy as np
import openai
import pytest
from elevenlabs.client import ElevenLabs
from test_voices_and_context import clip

from csmserve.audio.pcm import float_to_pcm16
from csmserve.client import CsmClient, ServerError
from csmserve.engine import SynthesisRequest
from csmserve.engine.fake import FakeEngine
from support.servers import running_server

TEXT = "Hello there, this voice should stay the same."
MAP = "alloy=anna,21m00Tcm4TlvDq8ikWAM=anna"
#: The environment the mapped server runs with: the CLI, run beside it, reads the same.
SERVER_ENV = {"CSM_DEFAULT_VOICE": "anna", "CSM_VOICE_MAP": MAP}


def voices_cli(voices_dir, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`csmserve voices ARGS` as an operator runs it, on ``voices_dir`` (CSM_VOICES_DIR)."""
    environ = {**{k: v for k, v in os.environ.items() if not k.startswith("CSM_")}, "CSM_VOICES_DIR": str(voices_dir), **env}
    return subprocess.run(
        [sys.executable, "-m", "csmserve", "voices", *args], env=environ, capture_output=True, text=True, timeout=120,
        check=False,
    )


def spoken_as(engine: FakeEngine, speaker_id: int, text: str = TEXT) -> bytes:
    """What the fake engine says for ``text`` as ``speaker_id``, as 16-bit PCM."""
    return float_to_pcm16(engine.render(SynthesisRequest(text, speaker_id=speaker_id, max_audio_ms=90_000))).tobytes()


def openai_pcm(server, **kwargs) -> bytes:
    client = openai.OpenAI(base_url=server.http + "/v1", api_key="unused", max_retries=0)
    return client.audio.speech.create(model="tts-1", input=TEXT, response_format="pcm", **kwargs).content


def elevenlabs_pcm(server, voice_id: str) -> bytes:
    client = ElevenLabs(api_key="unused", base_url=server.http, timeout=30)
    return b"".join(client.text_to_speech.convert(voice_id, text=TEXT, output_format="pcm_24000"))


@pytest.fixture
def reference(tmp_path):
    path = tmp_path / "anna.wav"
    path.write_bytes(clip("WAV", seconds=2.0))
    return path


@pytest.fixture
def mapped_server(settings_factory, tmp_path):
    """A running server (fake engine) whose default voice and voice map name anna, not yet registered."""
    settings = settings_factory(engine="fake", voices_dir=tmp_path / "voices", default_voice="anna", voice_map=MAP)
    with running_server(settings, FakeEngine()) as server:
        server.wait_ready()
        yield server


async def test_the_cli_adds_a_voice_a_running_server_uses_by_name_and_mapped_names(mapped_server, reference, tmp_path):
    """`voices add` while the server runs: the seed API by name, OpenAI's alloy and an ElevenLabs id
    through the map all speak as the voice's speaker (5); the server encoded the clip on first use."""
    voices_dir = tmp_path / "voices"
    added = voices_cli(voices_dir, "add", "anna", str(reference), "--text", "This is how I sound.", "--speaker", "5")
    assert added.returncode == 0, added.stderr
    assert "added anna (voice_" in added.stdout and "2.0 s clip" in added.stdout
    listed = voices_cli(voices_dir, "list")
    assert "pending (encoded on first use)" in listed.stdout and "This is how I sound." in listed.stdout
    engine = mapped_server.engine
    async with CsmClient(mapped_server.ws) as client:
        assert (await client.synthesize(TEXT, speaker_id=None, voice="anna")).pcm == spoken_as(engine, 5)
    assert openai_pcm(mapped_server, voice="alloy") == spoken_as(engine, 5)
    assert elevenlabs_pcm(mapped_server, "21m00Tcm4TlvDq8ikWAM") == spoken_as(engine, 5)
    assert openai_pcm(mapped_server, voice="echo") == spoken_as(engine, 4)  # unmapped: still speaker 4
    meta = json.loads(next(voices_dir.glob("voice_*.json")).read_text())
    assert meta["pending"] is False and meta["frames"] == 25  # 2 s of clip, encoded by the engine
    listed = voices_cli(voices_dir, "list", **SERVER_ENV)
    assert "encoded" in listed.stdout and "pending" not in listed.stdout
    assert "default voice (CSM_DEFAULT_VOICE): anna" in listed.stdout
    assert "mapped (CSM_VOICE_MAP): alloy -> anna" in listed.stdout


async def test_a_voice_the_cli_removes_is_gone_from_the_running_server(mapped_server, reference, tmp_path):
    """`voices remove`: the server no longer speaks it by name, and mapped names say their voice is missing."""
    voices_dir = tmp_path / "voices"
    assert voices_cli(voices_dir, "add", "anna", str(reference), "--text", "Hi.").returncode == 0
    assert openai_pcm(mapped_server, voice="anna") == spoken_as(mapped_server.engine, 0)
    removed = voices_cli(voices_dir, "remove", "anna", **SERVER_ENV)
    assert removed.returncode == 0 and "removed anna" in removed.stdout
    assert "CSM_DEFAULT_VOICE='anna' is not a registered voice" in removed.stderr
    async with CsmClient(mapped_server.ws) as client:
        with pytest.raises(ServerError) as caught:
            await client.synthesize(TEXT, speaker_id=None, voice="anna")
    assert "unknown voice 'anna'" in caught.value.event["error"]["message"]
    with pytest.raises(openai.NotFoundError) as missing:
        openai_pcm(mapped_server, voice="alloy")
    assert "means 'anna' (CSM_VOICE_MAP), which is not registered" in str(missing.value)
    assert not list(voices_dir.glob("voice_*"))


async def test_the_default_voice_applies_when_a_request_names_none(mapped_server, reference, tmp_path):
    """With CSM_DEFAULT_VOICE=anna (speaker 7): a seed request with neither voice nor speaker, an OpenAI
    request without voice and ElevenLabs' voice id "default" speak as anna; a named speaker stays itself."""
    assert voices_cli(tmp_path / "voices", "add", "anna", str(reference), "--speaker", "7").returncode == 0
    engine = mapped_server.engine
    async with CsmClient(mapped_server.ws) as client:
        assert (await client.synthesize(TEXT, speaker_id=None)).pcm == spoken_as(engine, 7)
        assert (await client.synthesize(TEXT, speaker_id=2)).pcm == spoken_as(engine, 2)
    response = httpx.post(mapped_server.http + "/v1/audio/speech", json={"model": "tts-1", "input": TEXT, "response_format": "pcm"})
    assert response.status_code == 200 and response.content == spoken_as(engine, 7)
    assert elevenlabs_pcm(mapped_server, "default") == spoken_as(engine, 7)
    rest = httpx.post(mapped_server.http + "/generate", json={"text": TEXT}, headers={"Accept": "audio/wav"})
    assert rest.content.endswith(spoken_as(engine, 7))


async def test_an_unregistered_default_voice_warns_at_start_up_and_fails_requests_clearly(settings_factory, caplog):
    """CSM_DEFAULT_VOICE naming no registered voice: a start-up warning, and a request naming no voice
    fails saying so (never a silent fall-back to a bare speaker)."""
    caplog.set_level(logging.WARNING)
    with running_server(settings_factory(engine="fake", default_voice="ghost"), FakeEngine()) as server:
        assert "CSM_DEFAULT_VOICE='ghost' is not a registered voice" in caplog.text
        server.wait_ready()
        async with CsmClient(server.ws) as client:
            with pytest.raises(ServerError) as caught:
                await client.synthesize(TEXT, speaker_id=None)
            assert (await client.synthesize(TEXT, speaker_id=3)).pcm == spoken_as(server.engine, 3)
    assert caught.value.code == "voice_unavailable"
    assert "CSM_DEFAULT_VOICE" in caught.value.event["error"]["message"]


def test_the_cli_refuses_what_the_api_refuses_with_clear_errors(tmp_path, reference):
    """Reserved and taken names, mapped names, a bad clip, a missing file: exit 1 and the reason."""
    voices_dir = tmp_path / "voices"
    (tmp_path / "noise.wav").write_bytes(b"not audio")
    assert voices_cli(voices_dir, "add", "anna", str(reference)).returncode == 0
    cases = [
        (("add", "alloy", str(reference)), "'alloy' is reserved"),
        (("add", "bob", str(reference)), "'bob' is reserved (a name mapped by CSM_VOICE_MAP)"),
        (("add", "ANNA", str(reference)), "a voice named 'ANNA' exists already"),
        (("add", "zoe", str(tmp_path / "noise.wav")), "cannot read the audio file"),
        (("add", "zoe", str(tmp_path / "missing.wav")), "cannot read"),
        (("remove", "zoe"), "no voice 'zoe'"),
    ]
    for args, fragment in cases:
        result = voices_cli(voices_dir, *args, CSM_VOICE_MAP="bob=anna")
        assert result.returncode == 1 and fragment in result.stderr, (args, result.stderr)
    assert len(list(voices_dir.glob("voice_*.json"))) == 1


async def test_a_request_without_a_voice_on_a_real_model_is_logged_once_per_connection(settings_factory, caplog):
    """On a real model (not the offline one), a bare speaker id is logged as a varying voice once per
    connection; a request in a registered voice is not."""
    from test_voices_and_context import register

    engine = FakeEngine()
    engine.info.offline_model = False  # stands in for the real weights: only they have voices to vary
    caplog.set_level(logging.WARNING, logger="csmserve.speech.voices")
    with running_server(settings_factory(engine="fake"), engine) as server:
        server.wait_ready()
        register(server.http, clip("WAV"), name="host", speaker_id=1)
        async with CsmClient(server.ws) as client:
            await client.synthesize(TEXT, speaker_id=None, voice="host")
            assert "names no voice" not in caplog.text
            await client.synthesize(TEXT, speaker_id=3)
            await client.synthesize(TEXT, speaker_id=4)
        assert caplog.text.count("names no voice") == 1
        async with CsmClient(server.ws) as client:
            await client.synthesize(TEXT, speaker_id=3)
        assert caplog.text.count("names no voice") == 2
        assert "speaks as bare speaker 3" in caplog.text and "CSM_DEFAULT_VOICE" in caplog.text


async def test_the_offline_model_encodes_a_cli_voice_on_first_use(csm_server, reference):
    """With the offline CSM: a voice the CLI added changes the output, its codes come from the model's
    codec (one frame per 80 ms of clip), and the stored codes serve the next request alike."""
    voices_dir = csm_server.app.state.csm.settings.voices_dir
    added = voices_cli(voices_dir, "add", "clipped", str(reference), "--text", "This is how I sound.", "--speaker", "1")
    assert added.returncode == 0, added.stderr
    async with CsmClient(csm_server.ws) as client:
        plain = await client.synthesize("Same words.", max_audio_ms=480, seed=5, speaker_id=1)
        voiced = await client.synthesize("Same words.", max_audio_ms=480, seed=5, voice="clipped")
        again = await client.synthesize("Same words.", max_audio_ms=480, seed=5, voice="clipped")
    assert voiced.pcm != plain.pcm and again.pcm == voiced.pcm
    [voice] = [v for v in httpx.get(csm_server.http + "/v1/voices").json()["data"] if v["name"] == "clipped"]
    codes = np.load(voices_dir / f"{voice['id']}.npy")
    assert voice["pending"] is False and voice["frames"] == 25 and codes.shape == (25, 32)
