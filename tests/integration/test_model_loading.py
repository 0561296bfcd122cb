"""Model loading: every failure stops start-up with an actionable message, never the offline model instead.

The hub is simulated on a loopback port with the hub's own error answers; nothing leaves this machine.
Most cases load in this process (``hub_env`` points huggingface_hub at the simulated hub, an empty cache
and no login); two run the real CLI, for its exit code and what it prints.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from csmserve.engine.loading import codec_to_float32_on_cpu, load_csm, this_cpu_bf16_native
from csmserve.errors import LoadOutOfMemory, ModelDiskFull, ModelLoadError, NotACsmCheckpoint
from support.fake_hub import fake_hub
from support.servers import running_server

EXIT_LOAD_FAILED = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(tmp_path: Path, **extra: str) -> dict:
    """The test's environment without hub credentials or offline switches, and an empty HF cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "CSM_"))}
    env.update(HF_HOME=str(tmp_path / "hf-home"), CSM_AUDIO_DIR=str(tmp_path / "audio"), CSM_VOICES_DIR=str(tmp_path / "voices"))
    env.update(extra)
    return env


def serve(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "csmserve", "serve", "--host", "127.0.0.1", "--port", str(free_port()), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def last_error(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert lines, result.stderr[-2000:]
    return lines[-1]


@pytest.fixture(scope="module")
def hub():
    with fake_hub() as server:
        yield f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """This process's view of the hub: an empty cache, no saved login, no token in the environment,
    online, and the hub on a port where nothing listens (``on_hub`` moves it to the simulated one)."""
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    return constants


@pytest.fixture
def on_hub(hub, hub_env, monkeypatch):
    """``hub_env`` with the simulated hub answering."""
    monkeypatch.setattr(hub_env, "ENDPOINT", hub)
    return hub_env


def load_error(model: str, token: str | None = None) -> str:
    """The message of the :class:`ModelLoadError` that loading ``model`` raises."""
    with pytest.raises(ModelLoadError) as caught:
        load_csm(model, "cpu", "float32", token=token)
    return caught.value.message


def test_gated_model_without_token_says_how_to_get_access(on_hub):
    """No token for the gated model: name the licence page and HF_TOKEN."""
    message = load_error("sesame/csm-1b")
    assert "gated" in message and "no Hugging Face token" in message
    assert "https://huggingface.co/sesame/csm-1b" in message
    assert "HF_TOKEN" in message and "settings/tokens" in message


def test_gated_model_with_a_token_lacking_access_says_accept_the_licence(on_hub):
    """A token without access: tell the user to accept the licence."""
    assert "accept the licence at https://huggingface.co/org/gated-with-token" in load_error("org/gated-with-token", "hf_test")


def test_invalid_token_is_reported_as_rejected(on_hub):
    """A token the hub rejects (401 invalid credentials): say the token is invalid, never show it."""
    message = load_error("org/bad-token", "hf_bad")
    assert "rejected your token" in message and "HF_TOKEN" in message and "hf_bad" not in message


def test_unknown_model_id_is_not_found(on_hub):
    """A repository that does not exist: check the model id."""
    assert "org/missing was not found" in load_error("org/missing", "hf_test")


def test_unreachable_hub_without_cache_says_so(hub_env):
    """The hub cannot be reached and nothing is cached: explain the options."""
    message = load_error("sesame/csm-1b", "hf_test")
    assert "cannot reach the Hugging Face hub" in message and "not in the local cache" in message
    assert "--model /path/to/a/local/checkpoint" in message


def test_offline_mode_without_cache_names_hf_hub_offline(hub_env, monkeypatch):
    """HF_HUB_OFFLINE set and nothing cached: say that the switch is what stops the download."""
    monkeypatch.setattr(hub_env, "HF_HUB_OFFLINE", True)
    message = load_error("sesame/csm-1b", "hf_test")
    assert "HF_HUB_OFFLINE is set" in message and hub_env.HF_HUB_CACHE in message


def test_a_token_without_network_stops_start_up_instead_of_serving_noise(tmp_path):
    """No model named, a token, no hub: exit 3 saying why sesame/csm-1b was chosen; no offline model."""
    env = clean_env(tmp_path, HF_TOKEN="hf_fake", HF_ENDPOINT=f"http://127.0.0.1:{free_port()}",
                    CSM_OFFLINE_MODEL_DIR=str(tmp_path / "offline"))  # fmt: skip
    result = serve([], env)
    assert result.returncode == EXIT_LOAD_FAILED
    message = last_error(result)
    assert "cannot reach the Hugging Face hub" in message
    assert "sesame/csm-1b was chosen because a Hugging Face token is set" in message
    assert "--model offline" in message and "hf_fake" not in result.stderr
    assert "OFFLINE MODEL" not in result.stderr and not (tmp_path / "offline").exists()


def load_failure(settings, engine=None) -> tuple[dict, list]:
    """Start a server in this process whose load must fail: its /health once it has, and every /ready
    status seen on the way (none may be 200)."""
    from csmserve.engine.csm import CsmEngine

    failures, readiness = [], []
    with running_server(settings, engine or CsmEngine(settings), failures.append) as server:
        deadline = time.monotonic() + 60
        while not failures and time.monotonic() < deadline:
            readiness.append(httpx.get(server.http + "/ready").status_code)
            time.sleep(0.02)
        readiness.append(httpx.get(server.http + "/ready").status_code)
        health = httpx.get(server.http + "/health")
    assert failures, "the load did not fail"
    assert health.status_code == 503
    return health.json(), readiness


@pytest.mark.parametrize(("named", "reason"), [("missing", "does not exist"), ("sesame/csm-1b", "cannot reach")])
def test_a_named_model_that_does_not_load_is_never_ready(settings_factory, tmp_path, hub_env, named, reason):
    """--model names a missing directory, or a hub model with no hub: the load fails, /health says why,
    /ready never answers 200, and the offline model is never written."""
    model = str(tmp_path / named) if named == "missing" else named
    settings = settings_factory(model=model, device="cpu", offline_model_dir=tmp_path / "offline")
    health, readiness = load_failure(settings)
    assert set(readiness) == {503}
    assert health["status"] == "failed" and reason in health["error"]["message"]
    assert health["offline_model"] is False and not (tmp_path / "offline").exists()


def test_a_token_whose_licence_is_not_accepted_is_never_ready(settings_factory, tmp_path, on_hub, monkeypatch):
    """No model named, a token the gated repo refuses: the load fails with the licence to accept, never the offline model."""
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    settings = settings_factory(device="cpu", offline_model_dir=tmp_path / "offline")
    health, readiness = load_failure(settings)
    assert set(readiness) == {503}
    message = health["error"]["message"]
    assert "accept the licence at https://huggingface.co/sesame/csm-1b" in message
    assert "chosen because a Hugging Face token is set" in message and "--model offline" in message
    assert health["offline_model"] is False and not (tmp_path / "offline").exists()


def test_nothing_asked_for_runs_the_offline_model_and_says_so(settings_factory, tiny_model_dir, hub_env, caplog):
    """No model, no token, no cache: the offline model loads, with the banner and /health saying so."""
    caplog.set_level("INFO", logger="csmserve.engine.csm")
    from csmserve.engine.csm import CsmEngine

    settings = settings_factory(device="cpu", dtype="float32", warmup=False, offline_model_dir=tiny_model_dir)
    with running_server(settings, CsmEngine(settings)) as server:
        health = server.wait_ready()
        assert httpx.get(server.http + "/ready").status_code == 200
    assert health["offline_model"] is True and health["voice"].startswith("offline model")
    log = caplog.text
    assert "neither a Hugging Face token nor a cached copy" in log and "OFFLINE MODEL" in log


def test_the_offline_model_asked_for_by_name_loads_despite_a_token(settings_factory, tiny_model_dir, hub_env, monkeypatch):
    """--model offline with a token set: the offline model, no hub request, /health says offline."""
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    from csmserve.engine.csm import CsmEngine

    settings = settings_factory(model="offline", device="cpu", dtype="float32", warmup=False, offline_model_dir=tiny_model_dir)
    with running_server(settings, CsmEngine(settings)) as server:
        assert server.wait_ready()["offline_model"] is True


def test_a_full_disk_during_the_download_says_where_and_how_much(tiny_model_dir, hub_env, monkeypatch):
    """The disk fills up while the weights download: ModelDiskFull naming the cache and HF_HOME."""
    import errno

    import huggingface_hub

    def disk_full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", disk_full)
    with pytest.raises(ModelDiskFull) as caught:
        load_csm("sesame/csm-1b", "cpu", "float32", token="hf_test")
    message = caught.value.message
    assert hub_env.HF_HUB_CACHE in message and "6 GB" in message and "HF_HOME" in message


@pytest.mark.parametrize("kind", ["missing-dir", "no-config", "other-model", "config-without-weights"])
def test_local_path_that_is_not_a_csm_checkpoint(tmp_path, kind):
    """A local directory that is not a CSM checkpoint: say what is wrong with it."""
    path = tmp_path / "ckpt"
    if kind != "missing-dir":
        path.mkdir()
    if kind == "other-model":
        (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    if kind == "config-without-weights":
        (path / "config.json").write_text(json.dumps({"model_type": "csm"}))
    message = load_error(str(path))
    expected = {
        "missing-dir": "does not exist",
        "no-config": "no config.json",
        "other-model": "model_type='llama', expected 'csm'",
        "config-without-weights": "no *.safetensors weights",
    }[kind]
    assert expected in message


def test_transformers_without_csm_says_to_upgrade(tmp_path, tiny_model_dir):
    """An old transformers (no CsmForConditionalGeneration): exit 3, name the version to install."""
    fake = tmp_path / "old-transformers" / "transformers"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "4.40.0"\n')
    # The fake first, then this checkout's src (the PYTHONPATH the tests run with).
    env = clean_env(tmp_path, PYTHONPATH=os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")]))
    result = serve(["--model", str(tiny_model_dir)], env)
    assert result.returncode == EXIT_LOAD_FAILED
    message = last_error(result)
    assert "transformers 4.40.0 has no CSM support" in message
    assert "transformers>=4.52.1" in message


def raise_cuda_oom(*_args, **_kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_at_load_suggests_a_dtype_or_device(tiny_model_dir):
    """OOM while loading weights becomes LoadOutOfMemory naming --dtype and --device."""
    with pytest.raises(LoadOutOfMemory) as caught:
        load_csm(str(tiny_model_dir), "cpu", "float32", from_pretrained=raise_cuda_oom)
    assert "--dtype bfloat16" in caught.value.message and "--device cpu" in caught.value.message


def test_out_of_memory_at_load_shows_on_health(tiny_model_dir, settings_factory):
    """A server whose model failed to load says "failed" with the reason on /health."""
    from csmserve.engine.csm import CsmEngine

    settings = settings_factory(model=str(tiny_model_dir), device="cpu", dtype="float32")
    failures = []
    with running_server(settings, CsmEngine(settings, from_pretrained=raise_cuda_oom), failures.append) as server:
        deadline = time.monotonic() + 60
        while not failures and time.monotonic() < deadline:
            time.sleep(0.05)
        response = httpx.get(server.http + "/health")
    assert response.status_code == 503
    assert response.json()["status"] == "failed"
    assert response.json()["error"]["code"] == "out_of_memory"


def test_cuda_requested_without_cuda_is_explained(tiny_model_dir):
    """--device cuda on a machine without CUDA names the fix instead of a torch traceback."""
    if torch.cuda.is_available():
        pytest.fail("this test describes a CPU-only machine")
    with pytest.raises(Exception) as caught:
        load_csm(str(tiny_model_dir), "cuda", "auto")
    assert "--device cpu" in str(caught.value)


def test_broken_checkpoint_is_not_a_csm_checkpoint(tmp_path, tiny_model_dir):
    """Corrupt weights are reported as a broken checkpoint, not a crash."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(NotACsmCheckpoint):
        load_csm(str(broken), "cpu", "float32")


def test_bfloat16_on_cpu_keeps_the_codec_in_float32_unless_bf16_is_native(tiny_model_dir):
    """bfloat16 on this CPU: the transformers load in bfloat16; the codec is float32 unless bf16 is native."""
    from csmserve.engine.mimi_stream import StreamingMimiDecoder

    loaded = load_csm(str(tiny_model_dir), "cpu", "bfloat16")
    model = loaded.model
    assert loaded.dtype == "bfloat16"
    assert model.backbone_model.embed_tokens.embed_audio_tokens.weight.dtype == torch.bfloat16
    assert model.depth_decoder.codebooks_head.weight.dtype == torch.bfloat16
    codec_dtype = torch.bfloat16 if this_cpu_bf16_native() else torch.float32
    assert {p.dtype for p in model.codec_model.parameters()} == {codec_dtype}
    audio = StreamingMimiDecoder(model.codec_model).decode(torch.randint(0, 2048, (32, 3)))
    assert audio.shape == (3 * 1920,) and audio.dtype == torch.float32 and audio.abs().max() > 0


@pytest.mark.parametrize(("native", "codec_dtype"), [(False, torch.float32), (True, torch.bfloat16)])
def test_bfloat16_codec_follows_whether_the_cpu_runs_bf16_natively(tiny_model_dir, native, codec_dtype):
    """Without native bf16 the codec goes back to float32 (and decodes like one); with it, it stays bfloat16."""
    from transformers import CsmForConditionalGeneration

    from csmserve.engine.mimi_stream import StreamingMimiDecoder

    model = CsmForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    assert codec_to_float32_on_cpu(model, "cpu", bf16_native=native) is (not native)
    assert {p.dtype for p in model.codec_model.parameters()} == {codec_dtype}
    assert codec_to_float32_on_cpu(model, "cuda", bf16_native=False) is False  # a GPU keeps what it has
    if not native:
        codes = torch.randint(0, 2048, (32, 3))
        audio = StreamingMimiDecoder(model.codec_model).decode(codes)
        with torch.inference_mode():
            whole = model.codec_model.decode(codes[None]).audio_values[0, 0]
        assert torch.allclose(audio, whole, atol=1e-4)


def test_auto_dtype_on_cpu_is_what_this_cpu_runs_natively(tiny_model_dir, caplog):
    """--dtype auto on this CPU loads bfloat16 where bf16 is native, float32 elsewhere, and logs why."""
    caplog.set_level("INFO", logger="csmserve.engine.loading")
    loaded = load_csm(str(tiny_model_dir), "cpu", "auto")
    expected = "bfloat16" if this_cpu_bf16_native() else "float32"
    assert loaded.dtype == expected
    weights = loaded.model.backbone_model.embed_tokens.embed_audio_tokens.weight
    assert weights.dtype == getattr(torch, expected)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("loading "))
    assert f"in {expected} (auto: " in line and torch.backends.cpu.get_cpu_capability() in line
