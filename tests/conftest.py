"""Shared fixtures: the offline checkpoint, and real servers on loopback ports."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Nothing may reach a hub at test time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# torch.compile's on-disk cache does not tell kernels built for one ATEN_CPU_CAPABILITY from another's:
# a run forced down to AVX2 (tests/README.md) reusing the default run's kernels generates wrong codes.
# Each forced level gets a cache of its own.
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import getpass
    import tempfile

    level = os.environ["ATEN_CPU_CAPABILITY"].lower()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{level}"
    )

import torch  # noqa: E402

# The offline model is tiny: one intra-op thread is fastest, and two would fight the server threads.
torch.set_num_threads(1)

from support.servers import running_server  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The offline checkpoint, written once per test session through ``make_tiny_model``."""
    from csmserve.engine.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-csm"))


@pytest.fixture
def settings_factory(tmp_path):
    from csmserve.config import Settings

    def make(**overrides):
        overrides.setdefault("audio_dir", tmp_path / "audio")
        overrides.setdefault("voices_dir", tmp_path / "voices")
        overrides.setdefault("port", 0)
        overrides.setdefault("host", "127.0.0.1")
        return Settings(**overrides)

    return make


@pytest.fixture
def fake_server(settings_factory):
    """A real server on a loopback port with the deterministic fake engine."""
    from csmserve.engine.fake import FakeEngine

    engine = FakeEngine()
    with running_server(settings_factory(engine="fake"), engine) as server:
        yield server


@pytest.fixture(scope="module")
def csm_server(tiny_model_dir, tmp_path_factory):
    """A real server on a loopback port running the offline CSM checkpoint (CPU, float32)."""
    from csmserve.config import Settings

    settings = Settings(
        model=str(tiny_model_dir),
        device="cpu",
        dtype="float32",
        host="127.0.0.1",
        port=0,
        audio_dir=tmp_path_factory.mktemp("audio"),
        voices_dir=tmp_path_factory.mktemp("voices"),
        max_audio_ms=4000,
        torch_threads=1,
    )
    with running_server(settings) as server:
        server.wait_ready()
        yield server
