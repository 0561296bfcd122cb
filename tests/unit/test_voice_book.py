"""What a voice string names (the voice map, the default voice), and voices added without a model."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from csmserve.config import Settings
from csmserve.errors import Conflict, InvalidRequest, VoiceUnavailable
from csmserve.speech.voices import VoiceBook, VoiceChoice, choose_voice
from csmserve.voices import VoiceStore


def codes(frames: int = 5) -> np.ndarray:
    return np.arange(frames * 32, dtype=np.int16).reshape(frames, 32)


def test_the_voice_map_comes_from_the_setting_and_its_file(tmp_path):
    """CSM_VOICE_MAP pairs and CSM_VOICE_MAP_FILE lines (comments skipped) make one map, names as written."""
    mapping = tmp_path / "voices.map"
    mapping.write_text("# ElevenLabs ids our clients hard-code\n21m00Tcm4TlvDq8ikWAM = anna\n\nEcho=bob\n")
    settings = Settings(voice_map="alloy=anna, nova=bob", voice_map_file=mapping)
    assert settings.voice_aliases() == {"alloy": "anna", "nova": "bob", "21m00Tcm4TlvDq8ikWAM": "anna", "Echo": "bob"}


@pytest.mark.parametrize(
    "voice_map, fragment",
    [
        ("alloy", "is not NAME=VOICE"),
        ("alloy=", "is not NAME=VOICE"),
        ("alloy=anna,ALLOY=bob", "mapped twice"),
        ("3=anna", "speaker ids stay speaker ids"),
        ("alloy=4", "speaker ids stay speaker ids"),
    ],
)
def test_a_malformed_voice_map_stops_start_up_with_its_reason(voice_map, fragment):
    """A pair that is not NAME=VOICE, a name twice (any case) or a speaker id: a settings error naming it."""
    with pytest.raises(ValidationError) as caught:
        Settings(voice_map=voice_map)
    assert fragment in str(caught.value)


def test_an_unreadable_voice_map_file_stops_start_up(tmp_path):
    with pytest.raises(ValidationError) as caught:
        Settings(voice_map_file=tmp_path / "missing.map")
    assert "cannot read voice_map_file" in str(caught.value)


@pytest.fixture
def book(tmp_path):
    store = VoiceStore(tmp_path)
    store.add("anna", 5, "hello there", codes())
    return VoiceBook(store, {"alloy": "anna", "21m00Tcm4TlvDq8ikWAM": "anna", "ghost": "nobody"}, default="anna")


def test_a_mapped_name_means_its_voice_before_the_speaker_it_stood_for(book):
    """alloy mapped to anna names anna (any case); unmapped OpenAI names stay speaker ids; digits stay speakers."""
    assert choose_voice("ALLOY", book, speaker_names=True) == VoiceChoice(voice="ALLOY")
    assert book.resolve("ALLOY").name == "anna"
    assert book.resolve("21m00Tcm4TlvDq8ikWAM").name == "anna"
    assert choose_voice("echo", book, speaker_names=True) == VoiceChoice(speaker_id=4)
    assert choose_voice("7", book) == VoiceChoice(speaker_id=7)


def test_default_names_the_default_voice_only_when_one_is_set(book, tmp_path):
    assert book.resolve("default").name == "anna"
    assert choose_voice("default", VoiceBook(book.store), speaker_names=True) is None


def test_a_configured_name_whose_voice_is_not_registered_is_a_clear_error(book):
    """A mapped name or default pointing at nothing: VoiceUnavailable naming the setting; any other
    unknown name: InvalidRequest."""
    with pytest.raises(VoiceUnavailable) as caught:
        book.resolve("ghost")
    assert "CSM_VOICE_MAP" in caught.value.message and "'nobody'" in caught.value.message
    book.store.delete(book.store.get("anna").id)
    with pytest.raises(VoiceUnavailable) as caught:
        book.resolve("default")
    assert "CSM_DEFAULT_VOICE" in caught.value.message
    with pytest.raises(InvalidRequest):
        book.resolve("stranger")


def test_problems_name_every_configured_voice_that_is_not_registered(book):
    assert book.problems() == ["CSM_VOICE_MAP maps 'ghost' to 'nobody', which is not a registered voice"]
    missing = VoiceBook(book.store, default="zoe")
    assert "CSM_DEFAULT_VOICE='zoe' is not a registered voice" in missing.problems()[0]


@pytest.mark.parametrize(
    "name, error",
    [("Alloy", Conflict), ("4", Conflict), ("default", Conflict), ("21M00TCM4TLVDQ8IKWAM", Conflict),
     ("voice_AAAAAAAAAAAA", Conflict), ("ANNA", Conflict), (" ", InvalidRequest), ("x" * 65, InvalidRequest)],
)
def test_a_new_voice_may_not_take_a_name_that_means_something_else(book, name, error):
    """Speaker names and ids, voice ids, default, mapped names and taken names are refused, as are blank
    and over-long ones."""
    with pytest.raises(error):
        book.check_new(name, "words", 0, Settings())


def test_a_voice_added_as_a_clip_is_pending_until_a_server_encodes_it(tmp_path):
    """add_clip keeps the clip; another process sees the voice pending, then encoded once set_codes ran."""
    cli, server = VoiceStore(tmp_path), VoiceStore(tmp_path)
    voice = cli.add_clip("anna", 2, "hello there", b"RIFF....", samples=24_000)
    assert voice.pending and voice.frames == 12
    seen = server.get("anna")
    assert seen.pending and server.codes(seen.id) is None
    assert server.clip_path(seen.id).read_bytes() == b"RIFF...."
    encoded = server.set_codes(seen.id, codes(13))
    assert not encoded.pending and encoded.frames == 13
    assert cli.current(voice) == encoded
    assert np.array_equal(cli.codes(voice.id), codes(13))
    assert cli.delete(voice.id)
    assert not any(tmp_path.glob(f"{voice.id}.*"))


def test_two_stores_never_give_one_name_to_two_voices(tmp_path):
    """A name taken by another process on the directory is refused, whatever the case."""
    first, second = VoiceStore(tmp_path), VoiceStore(tmp_path)
    first.add("anna", 1, "hi", codes())
    with pytest.raises(Conflict):
        second.add_clip("ANNA", 1, "hi", b"RIFF", samples=24_000)
