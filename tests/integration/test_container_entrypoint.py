"""docker/entrypoint.sh under /bin/sh, with a stub `csmserve` on PATH that prints what it was given.

No Docker engine is needed: the script is run as the container would run it, and the stub shows the
command and environment it would have exec'd.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"

STUB = f"""#!{sys.executable}
import json, os, sys
print(json.dumps({{"argv": sys.argv[1:], "env": dict(os.environ)}}))
"""


class Run:
    def __init__(self, completed: subprocess.CompletedProcess):
        self.returncode = completed.returncode
        self.stderr = completed.stderr
        self.exec = json.loads(completed.stdout) if completed.stdout.strip() else None

    @property
    def argv(self) -> list[str]:
        return self.exec["argv"]

    @property
    def env(self) -> dict[str, str]:
        return self.exec["env"]


@pytest.fixture
def run_entrypoint(tmp_path):
    """Run the entrypoint with a clean environment, HF_HOME in tmp_path and the stub csmserve on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "csmserve").write_text(STUB)
    (bin_dir / "csmserve").chmod(0o755)

    def run(*args: str, **env: str) -> Run:
        base = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf")}
        completed = subprocess.run(
            ["/bin/sh", str(ENTRYPOINT), *args],
            env={**base, **env},
            capture_output=True,
            text=True,
            timeout=30,
        )
        return Run(completed)

    return run


def cache_model(hf_home: Path, repo_id: str = "sesame/csm-1b") -> None:
    snapshot = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")


def test_no_arguments_execs_csmserve_serve(run_entrypoint):
    """With no arguments the container becomes `csmserve serve`."""
    result = run_entrypoint(HF_TOKEN="hf_test")
    assert result.returncode == 0
    assert result.argv == ["serve"]


def test_flags_are_appended_to_serve(run_entrypoint):
    """Arguments that are flags go to `csmserve serve` unchanged."""
    result = run_entrypoint("--log-level", "debug", "--max-audio-ms", "5000", HF_TOKEN="hf_test")
    assert result.argv == ["serve", "--log-level", "debug", "--max-audio-ms", "5000"]


def test_a_csmserve_command_runs_that_command(run_entrypoint):
    """`say ...` as the container command runs `csmserve say ...`."""
    result = run_entrypoint("say", "Hello there", "-o", "/tmp/x.wav")
    assert result.argv == ["say", "Hello there", "-o", "/tmp/x.wav"]


def test_any_other_command_runs_as_given(run_entrypoint, tmp_path):
    """A command that is not csmserve's (a shell, say) runs as given."""
    marker = tmp_path / "ran"
    result = run_entrypoint("sh", "-c", f"echo yes > {marker}")
    assert result.returncode == 0
    assert marker.read_text() == "yes\n"


def test_csm_settings_reach_the_server_unchanged(run_entrypoint):
    """Every CSM_* variable is passed through to csmserve, which reads them itself."""
    result = run_entrypoint(
        HF_TOKEN="hf_test", CSM_PORT="9000", CSM_DTYPE="bfloat16", CSM_MAX_AUDIO_MS="30000"
    )
    assert {k: result.env[k] for k in ("CSM_PORT", "CSM_DTYPE", "CSM_MAX_AUDIO_MS")} == {
        "CSM_PORT": "9000",
        "CSM_DTYPE": "bfloat16",
        "CSM_MAX_AUDIO_MS": "30000",
    }


def test_settings_are_logged_with_secrets_hidden(run_entrypoint):
    """The CSM_* settings in force are logged, but a key or token value never is."""
    result = run_entrypoint(HF_TOKEN="hf_supersecret", CSM_API_KEY="k-123456", CSM_LOG_LEVEL="debug")
    assert "CSM_LOG_LEVEL=debug" in result.stderr
    assert "CSM_API_KEY=***" in result.stderr
    assert "k-123456" not in result.stderr and "hf_supersecret" not in result.stderr


def test_no_token_and_no_cache_warns_loudly_of_the_offline_model(run_entrypoint):
    """Without HF_TOKEN or a cached model the log says the audio will be noise; the server still starts."""
    result = run_entrypoint()
    assert "WARNING" in result.stderr
    assert "OFFLINE MODEL" in result.stderr and "NOISE" in result.stderr
    assert "HF_TOKEN" in result.stderr
    assert result.argv == ["serve"]


def test_a_token_silences_the_offline_warning(run_entrypoint):
    """With HF_TOKEN set there is no offline-model warning, and the token reaches the server."""
    result = run_entrypoint(HF_TOKEN="hf_test")
    assert "OFFLINE MODEL" not in result.stderr
    assert result.env["HF_TOKEN"] == "hf_test"


def test_a_cached_model_silences_the_offline_warning(run_entrypoint, tmp_path):
    """A copy of sesame/csm-1b in the HF cache on the volume is enough: no warning without a token."""
    cache_model(tmp_path / "hf")
    result = run_entrypoint()
    assert "OFFLINE MODEL" not in result.stderr
    assert "from the cache" in result.stderr


def test_token_file_is_read_into_hf_token(run_entrypoint, tmp_path):
    """HF_TOKEN_FILE (a Docker secret) provides HF_TOKEN, without its trailing newline."""
    secret = tmp_path / "hf_token"
    secret.write_text("hf_fromfile\n")
    result = run_entrypoint(HF_TOKEN_FILE=str(secret))
    assert result.env["HF_TOKEN"] == "hf_fromfile"
    assert "OFFLINE MODEL" not in result.stderr


def test_missing_token_file_stops_with_a_message(run_entrypoint, tmp_path):
    """An HF_TOKEN_FILE that does not exist stops the container before the server starts."""
    result = run_entrypoint(HF_TOKEN_FILE=str(tmp_path / "nope"))
    assert result.returncode == 2
    assert result.exec is None
    assert "HF_TOKEN_FILE" in result.stderr and "not a readable file" in result.stderr


def test_explicit_uncached_model_without_token_warns_it_will_not_fall_back(run_entrypoint):
    """An explicit CSM_MODEL that is neither cached nor reachable with a token gets its own warning."""
    result = run_entrypoint(CSM_MODEL="someone/gated-model")
    assert "someone/gated-model" in result.stderr and "never falls back" in result.stderr
    assert "OFFLINE MODEL" not in result.stderr


def test_the_offline_model_by_name_is_announced_even_with_a_token(run_entrypoint):
    """CSM_MODEL=offline: the log says the audio will be noise, whatever token is set."""
    result = run_entrypoint(CSM_MODEL="offline", HF_TOKEN="hf_test")
    assert "CSM_MODEL=offline" in result.stderr and "NOISE" in result.stderr
    assert result.env["CSM_MODEL"] == "offline"


def test_local_model_directory_needs_no_token(run_entrypoint, tmp_path):
    """A CSM_MODEL that is a directory is loaded from there: no warning about tokens."""
    result = run_entrypoint(CSM_MODEL=str(tmp_path))
    assert "WARNING: no HF_TOKEN" not in result.stderr
    assert f"local directory {tmp_path}" in result.stderr


@pytest.mark.parametrize("port", ["http", "0", "70000", ""])
def test_invalid_port_stops_with_a_message(run_entrypoint, port):
    """CSM_PORT must be a port number; otherwise the container stops before the server starts."""
    result = run_entrypoint(HF_TOKEN="hf_test", CSM_PORT=port)
    assert result.returncode == 2
    assert result.exec is None
    assert "CSM_PORT must be a port number" in result.stderr


def test_unwritable_hf_home_stops_with_a_message_about_the_volume(run_entrypoint, tmp_path):
    """An HF_HOME that cannot be created is refused with a message saying what to mount."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run_entrypoint(HF_TOKEN="hf_test", HF_HOME=str(blocker / "hf"))
    assert result.returncode == 2
    assert (
        "HF_HOME" in result.stderr
        and "not a writable directory" in result.stderr
        and "volume" in result.stderr
    )


def test_server_directories_are_created(run_entrypoint, tmp_path):
    """HF_HOME and the server's data directories exist when the server starts."""
    dirs = {
        "HF_HOME": tmp_path / "v" / "hf",
        "CSM_OFFLINE_MODEL_DIR": tmp_path / "v" / "off",
        "CSM_AUDIO_DIR": tmp_path / "v" / "audio",
        "CSM_VOICES_DIR": tmp_path / "v" / "voices",
    }
    run_entrypoint(HF_TOKEN="hf_test", **{k: str(v) for k, v in dirs.items()})
    assert all(path.is_dir() for path in dirs.values())


def test_missing_gpu_is_reported_unless_the_cpu_is_chosen(run_entrypoint):
    """The GPU warning appears exactly when no NVIDIA device is visible and CSM_DEVICE is not cpu."""
    gpu_visible = Path("/dev/nvidiactl").exists()
    assert ("no NVIDIA GPU is visible" in run_entrypoint(HF_TOKEN="hf_test").stderr) is not gpu_visible
    assert "no NVIDIA GPU is visible" not in run_entrypoint(HF_TOKEN="hf_test", CSM_DEVICE="cpu").stderr


def test_fake_engine_needs_no_model(run_entrypoint):
    """CSM_ENGINE=fake starts without model warnings."""
    result = run_entrypoint(CSM_ENGINE="fake")
    assert "OFFLINE MODEL" not in result.stderr and "engine: fake" in result.stderr
