"""A Ray replica's health check follows the server's readiness (fake engine, no Ray)."""

from __future__ import annotations

import asyncio

from csmserve.app import create_app
from csmserve.config import Settings
from csmserve.engine.fake import FakeEngine
from csmserve.scaleout.replica import health_problem


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
    state.admission.draining = True
    assert health_problem(state) == "draining"


def test_replicas_without_a_model_find_the_offline_model_written_once(tmp_path, monkeypatch):
    """No model and none available: the first replica writes the offline model; a second finds it."""
    from csmserve.engine.tiny import OFFLINE_MARKER
    from csmserve.scaleout.replica import prepare_offline_model

    monkeypatch.setattr("csmserve.engine.loading.default_model_available", lambda: False)
    settings = Settings(offline_model_dir=tmp_path / "offline")
    prepare_offline_model(settings)
    written = (tmp_path / "offline" / "config.json").stat().st_mtime_ns
    prepare_offline_model(settings)
    assert OFFLINE_MARKER in (tmp_path / "offline" / "config.json").read_text()
    assert (tmp_path / "offline" / "config.json").stat().st_mtime_ns == written


def test_replicas_asked_for_the_offline_model_by_name_write_it_even_with_a_token(tmp_path, monkeypatch):
    """--model offline: written under the lock though a token (or cache) would make csm-1b available;
    another model named: nothing is written."""
    from csmserve.engine.tiny import OFFLINE_MARKER
    from csmserve.scaleout.replica import prepare_offline_model

    monkeypatch.setattr("csmserve.engine.loading.default_model_available", lambda: True)
    prepare_offline_model(Settings(model="some/model", offline_model_dir=tmp_path / "other"))
    assert not (tmp_path / "other").exists()
    prepare_offline_model(Settings(model="offline", offline_model_dir=tmp_path / "offline"))
    assert OFFLINE_MARKER in (tmp_path / "offline" / "config.json").read_text()
