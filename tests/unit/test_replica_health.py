"""A Ray replica's health check follows the server's readiness (fake engine, no Ray)."""

from __future__ import annotations

import asyncio

from csmserve.config import Settings
from csmserve.engine.fake import FakeEngine
from csmserve.scaleout.replica import health_problem
from csmserve.server.app import create_app


def state_of(tmp_path):
    settings = Settings(engine="fake", audio_dir=tmp_path / "a", voices_dir=tmp_path / "v")
    return create_app(settings, FakeEngine()).state.csm


def test_a_loaded_replica_is_healthy_and_a_failed_engine_is_not(tmp_path):
    """Ready: healthy. The engine reports a failure (a GPU error): unhealthy, with its message."""
    state = state_of(tmp_path)
    asyncio.run(state.engine.start())
    assert health_problem(state) is None
    state.engine.info.failed = "CUDA error: an illegal memory access was encountered"
    assert "illegal memory access" in health_problem(state)


def test_a_loading_or_draining_replica_is_not_healthy(tmp_path):
    """Before the model is loaded, and while draining, the replica says why it must not serve."""
    state = state_of(tmp_path)
    assert health_problem(state) == "the model is not loaded"
    asyncio.run(state.engine.start())
    state.draining = True
    assert health_problem(state) == "draining"
