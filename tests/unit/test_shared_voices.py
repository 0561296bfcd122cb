"""Voices on a directory that several processes share (Ray Serve replicas on one volume)."""

from __future__ import annotations

import numpy as np

from csmserve.voices import VoiceStore


def codes(frames: int = 5) -> np.ndarray:
    return np.arange(frames * 32, dtype=np.int16).reshape(frames, 32)


def test_a_voice_added_by_one_store_is_found_by_another_on_the_same_directory(tmp_path):
    """A second store (another replica) finds a voice registered after it started, by id and by name."""
    first, second = VoiceStore(tmp_path), VoiceStore(tmp_path)
    voice = first.add("anna", 1, "hello there", codes(7))
    assert second.get(voice.id) == voice
    assert second.get("anna") == voice
    assert np.array_equal(second.codes(voice.id), codes(7))
    assert [v.id for v in second.list()] == [voice.id]


def test_a_voice_deleted_by_one_store_disappears_from_another(tmp_path):
    """A voice deleted through one replica is neither listed nor found by the others."""
    first, second = VoiceStore(tmp_path), VoiceStore(tmp_path)
    voice = first.add("anna", 1, "hello there", codes())
    assert second.get(voice.id) is not None
    assert first.delete(voice.id)
    assert second.get(voice.id) is None
    assert second.list() == []


def test_start_up_keeps_another_writers_fresh_temporary_file(tmp_path):
    """A replica starting while another writes a voice leaves that writer's temporary file alone."""
    writing = tmp_path / "voice_AAAAAAAAAAAA.npy.0123456789ab.tmp"
    writing.write_bytes(b"half")
    VoiceStore(tmp_path)
    assert writing.exists()
