"""The README is the front door: its client example runs as written and its table lists every setting."""

from __future__ import annotations

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


def test_readme_configuration_table_lists_every_setting():
    """Each Settings field has its CSM_* row in the README."""
    text = README.read_text()
    for name in Settings.model_fields:
        assert f"| `CSM_{name.upper()}` |" in text, name
