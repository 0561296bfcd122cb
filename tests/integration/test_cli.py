"""The CLI end to end: `csmserve serve` with no model configured, then `csmserve say` against it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import httpx
import pytest
import soundfile as sf
import websockets
from test_model_loading import clean_env, free_port


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`csmserve serve` as `make serve` runs it, on a machine with no token and no cached model."""
    tmp = tmp_path_factory.mktemp("cli")
    port = free_port()
    env = clean_env(tmp, CSM_OFFLINE_MODEL_DIR=str(tmp / "offline"), CSM_TORCH_THREADS="1", CSM_MAX_AUDIO_MS="3000")
    log = open(tmp / "server.log", "w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "csmserve", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert process.poll() is None, (tmp / "server.log").read_text()
            try:
                if httpx.get(url + "/health", timeout=2).json()["status"] == "healthy":
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail("server never became healthy:\n" + (tmp / "server.log").read_text())
        yield url, port, tmp
    finally:
        process.terminate()
        process.wait(20)
        log.close()


def test_without_token_or_cache_it_serves_the_offline_model_with_a_loud_warning(served):
    """No model configured and nothing available: the offline model, and the log says it is noise."""
    url, _, tmp = served
    body = httpx.get(url + "/health").json()
    assert body["offline_model"] is True and body["status"] == "healthy"
    log = (tmp / "server.log").read_text()
    assert "OFFLINE MODEL" in log and "NOISE" in log
    assert "export HF_TOKEN=<read token>, and restart" in log  # an instruction, not a redacted secret
    assert f"in {body['dtype']} (auto: " in log  # --dtype auto says what it picked and why
    assert (tmp / "offline" / "config.json").is_file()


def test_plain_websocket_client_gets_chunks_then_done(served):
    """The issue's 20-line client: 9600-byte binary chunks, then {"done": true}."""
    _, port, _ = served

    async def run():
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws/generate") as ws:
            await ws.send(json.dumps({"text": "Hello world, this is a test", "speaker_id": 0}))
            chunks = []
            while True:
                message = await ws.recv()
                if isinstance(message, bytes):
                    chunks.append(message)
                else:
                    return chunks, json.loads(message)

    chunks, done = asyncio.run(run())
    assert done["done"] is True
    assert chunks and all(len(c) == 9600 for c in chunks[:-1])


def test_say_writes_a_playable_wav_and_prints_time_to_first_audio(served):
    """`csmserve say` streams from the server into a 24 kHz mono 16-bit WAV."""
    _, port, tmp = served
    out = tmp / "hello.wav"
    result = subprocess.run(
        [sys.executable, "-m", "csmserve", "say", "Hello there.", "-o", str(out),
         "--url", f"ws://127.0.0.1:{port}/ws/generate", "--seed", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "time to first audio" in result.stdout
    info = sf.info(str(out))
    assert (info.samplerate, info.channels, info.subtype) == (24000, 1, "PCM_16")
    assert info.frames > 0


def test_start_up_log_has_no_third_party_config_warnings_and_no_empty_request_ids(served):
    """Loading the offline model (the real one's config layout) logs none of transformers' five token-id
    warnings, and lines outside a request carry no `[None]`."""
    _, _, tmp = served
    log = (tmp / "server.log").read_text()
    assert "model loaded in" in log  # the log does cover the load
    assert "must be `None` or an integer within the vocabulary" not in log
    assert "[transformers]" not in log
    assert "[None]" not in log
    assert " csmserve.app: ready: " in log


def test_say_follows_csm_port_and_names_the_server_that_answered(fake_server, tmp_path):
    """With CSM_PORT set to the server's (non-default) port and CSM_HOST the wildcard listen address,
    `say` reaches that server on loopback, writes its audio and says which server answered."""
    from csmserve.engine import SynthesisRequest

    text = "Hello on another port."
    out = tmp_path / "port.wav"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CSM_")}
    env.update(CSM_HOST="0.0.0.0", CSM_PORT=str(fake_server.port))
    result = subprocess.run(
        [sys.executable, "-m", "csmserve", "say", text, "-o", str(out)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 0, result.stderr
    assert fake_server.port != 8000
    assert f"server: ws://127.0.0.1:{fake_server.port}/ws/generate (fake-tone on " in result.stdout
    assert "the audio is noise" in result.stderr  # the fake engine reports itself as an offline model
    expected = fake_server.engine.render(SynthesisRequest(text, max_audio_ms=fake_server.app.state.csm.settings.audio_budget_ms(text)))
    assert sf.info(str(out)).frames == len(expected)


def test_say_refuses_a_port_no_client_can_reach(tmp_path):
    """CSM_PORT=0 (the server picks a free port) gives `say` nothing to connect to: a clear error."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CSM_")}
    env["CSM_PORT"] = "0"
    result = subprocess.run(
        [sys.executable, "-m", "csmserve", "say", "Hi", "-o", str(tmp_path / "x.wav")],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert result.returncode == 2
    assert "CSM_PORT='0' is not a port a client can connect to" in result.stderr and "--url" in result.stderr


def test_say_without_a_server_explains_itself(tmp_path):
    """`csmserve say` against a closed port says the server is not reachable."""
    result = subprocess.run(
        [sys.executable, "-m", "csmserve", "say", "Hi", "-o", str(tmp_path / "x.wav"),
         "--url", f"ws://127.0.0.1:{free_port()}/ws/generate"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert "is `csmserve serve` running?" in result.stderr


def test_help_lists_every_setting_with_its_environment_variable():
    """`csmserve serve --help` documents each setting and its CSM_* variable, without importing torch."""
    result = subprocess.run(
        [sys.executable, "-c", "import sys, runpy; sys.argv=['csmserve','serve','--help'];\n"
         "try:\n runpy.run_module('csmserve', run_name='__main__')\nexcept SystemExit: pass\n"
         "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"],
        capture_output=True, text=True, timeout=60,
    )
    from csmserve.config import Settings

    for name in Settings.model_fields:
        assert f"CSM_{name.upper()}" in result.stdout
    assert result.stdout.strip().endswith("NO-TORCH")
