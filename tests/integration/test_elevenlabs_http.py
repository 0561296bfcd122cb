"""ElevenLabs' HTTP text-to-speech and voice list, driven by the official ``elevenlabs`` SDK."""

from __future__ import annotations

import base64
import io
from itertools import pairwise

import av
import httpx
import pytest
from elevenlabs.client import ElevenLabs
from elevenlabs.core.api_error import ApiError
from elevenlabs.errors import UnprocessableEntityError

from csmserve.engine import SynthesisRequest
from csmserve.text.sentences import split_sentences
from test_elevenlabs_ws import ws_generate_audio

TEXT = "Hello from the ElevenLabs compatible endpoint. It speaks with CSM."


@pytest.fixture
def client(fake_server):
    return ElevenLabs(api_key="unused", base_url=fake_server.http, timeout=30)


def samples_24k(engine, text: str = TEXT, speaker_id: int = 0) -> int:
    return sum(
        len(engine.render(SynthesisRequest(s, speaker_id=speaker_id, max_audio_ms=90_000))) for s in split_sentences(text)
    )


async def test_convert_pcm_equals_what_ws_generate_sends(client, fake_server):
    """convert(output_format=pcm_24000, seed) is byte for byte /ws/generate's audio for the same text and seed."""
    audio = b"".join(client.text_to_speech.convert("0", text=TEXT, output_format="pcm_24000", seed=11, model_id="eleven_flash_v2_5"))
    assert audio == await ws_generate_audio(fake_server, TEXT, seed=11)


@pytest.mark.parametrize("fmt, rate", [("pcm_16000", 16000), ("pcm_44100", 44100), ("ulaw_8000", 8000), ("alaw_8000", 8000)])
def test_convert_returns_the_requested_format_and_rate(client, fake_server, fmt, rate):
    """Raw formats carry the utterance's duration at the requested rate (2 bytes a sample for PCM, 1 for G.711)."""
    audio = b"".join(client.text_to_speech.convert("0", text=TEXT, output_format=fmt))
    width = 2 if fmt.startswith("pcm") else 1
    expected = samples_24k(fake_server.engine) * rate / 24000
    assert abs(len(audio) / width - expected) <= 4


def test_default_format_is_mp3_at_44100(client, fake_server):
    """Without output_format the SDK gets ElevenLabs' default, mp3_44100_128, of the utterance's duration."""
    audio = b"".join(client.text_to_speech.convert("3", text=TEXT))
    with av.open(io.BytesIO(audio)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        assert (container.format.name, stream.rate) == ("mp3", 44100)
    assert samples / 44100 == pytest.approx(samples_24k(fake_server.engine, speaker_id=3) / 24000, abs=0.1)


def test_stream_delivers_the_audio_in_pieces(client):
    """stream() yields several pieces whose bytes are convert()'s bytes."""
    pieces = list(client.text_to_speech.stream("0", text=TEXT, output_format="pcm_24000"))
    assert len(pieces) > 2
    assert b"".join(pieces) == b"".join(client.text_to_speech.convert("0", text=TEXT, output_format="pcm_24000"))


def test_with_timestamps_aligns_every_character_over_the_audio(client, fake_server):
    """convert_with_timestamps: base64 audio, and character times from 0 to the audio's end."""
    result = client.text_to_speech.convert_with_timestamps("0", text=TEXT, output_format="pcm_22050")
    audio = base64.b64decode(result.audio_base_64)
    seconds = len(audio) / 2 / 22050
    alignment = result.alignment
    assert "".join(alignment.characters) == TEXT
    assert alignment.character_start_times_seconds[0] == 0
    # The resampler's last samples (22050 Hz) come out after the last sentence's end.
    assert alignment.character_end_times_seconds[-1] == pytest.approx(seconds, abs=0.025)
    assert alignment.character_start_times_seconds == sorted(alignment.character_start_times_seconds)
    assert result.normalized_alignment == alignment


def test_stream_with_timestamps_aligns_every_chunk_as_it_streams(client):
    """stream_with_timestamps: every chunk of audio carries the characters it speaks, and the chunks'
    alignments put together are convert_with_timestamps' alignment (times from the start of the audio)."""
    chunks = list(client.text_to_speech.stream_with_timestamps("0", text=TEXT, output_format="pcm_24000"))
    whole = client.text_to_speech.convert_with_timestamps("0", text=TEXT, output_format="pcm_24000")
    audio = b"".join(base64.b64decode(c.audio_base_64) for c in chunks)
    assert audio == base64.b64decode(whole.audio_base_64)
    with_audio = [c for c in chunks if c.audio_base_64]
    assert len(with_audio) > 4 and all(c.alignment and c.alignment.characters for c in with_audio)
    for name in ("alignment", "normalized_alignment"):
        parts = [getattr(c, name) for c in chunks if getattr(c, name)]
        for field in ("characters", "character_start_times_seconds", "character_end_times_seconds"):
            assert [x for part in parts for x in getattr(part, field)] == getattr(getattr(whole, name), field)
    assert "".join(whole.alignment.characters) == TEXT
    assert whole.alignment.character_end_times_seconds[-1] == pytest.approx(len(audio) / 2 / 24000, abs=0.001)
    parts = [c.alignment for c in with_audio]  # each chunk's characters fill its own audio: they join up
    assert all(b.character_start_times_seconds[0] == a.character_end_times_seconds[-1] for a, b in pairwise(parts))


def test_previous_text_and_body_fields_are_accepted(client, fake_server):
    """previous_text, next_text, voice_settings and language_code are accepted; the audio is still the text's."""
    audio = b"".join(
        client.text_to_speech.convert(
            "0", text=TEXT, output_format="pcm_24000", previous_text="Earlier words.", next_text="Later words.",
            voice_settings={"stability": 0.4, "similarity_boost": 0.7}, language_code="en",
        )
    )  # fmt: skip
    assert len(audio) == 2 * samples_24k(fake_server.engine)


def test_unknown_voice_is_a_404_voice_not_found(client):
    """An ElevenLabs voice id that is not a speaker or a registered voice: 404, detail.status voice_not_found."""
    with pytest.raises(ApiError) as caught:
        b"".join(client.text_to_speech.convert("21m00Tcm4TlvDq8ikWAM", text=TEXT))
    assert caught.value.status_code == 404 and caught.value.body["detail"]["status"] == "voice_not_found"


def test_bad_fields_are_422s_the_sdk_raises(client):
    """A bad output_format or an empty text: UnprocessableEntityError with FastAPI's detail list naming the field."""
    with pytest.raises(UnprocessableEntityError) as caught:
        b"".join(client.text_to_speech.convert("0", text=TEXT, output_format="opus_48000_32"))
    assert caught.value.body["detail"][0]["loc"] == ["query", "output_format"]
    with pytest.raises(UnprocessableEntityError):
        b"".join(client.text_to_speech.convert("0", text="  "))


def test_text_over_the_limit_is_a_400(settings_factory):
    """Text over CSM_MAX_TEXT_CHARS: 400 max_character_limit_exceeded; the server keeps serving."""
    from csmserve.engine.fake import FakeEngine
    from support.servers import running_server

    with running_server(settings_factory(engine="fake", max_text_chars=20), FakeEngine()) as server:
        url = server.http + "/v1/text-to-speech/0/stream/with-timestamps"
        response = httpx.post(url, json={"text": "x" * 21})
        assert response.status_code == 400
        assert response.json()["detail"]["status"] == "max_character_limit_exceeded"
        assert httpx.post(url, json={"text": "Short."}).status_code == 200


def test_voices_list_speakers_and_registered_voices_both_ways(client, fake_server):
    """GET /v1/voices: the SDK's voices.get_all() sees speakers and registered voices; csmserve's data list stays."""
    from test_voices_and_context import clip, register

    voice = register(fake_server.http, clip("WAV"), name="host", speaker_id=5).json()
    listed = client.voices.get_all()
    ids = {v.voice_id: v.name for v in listed.voices}
    assert ids["0"] == "CSM speaker 0" and ids[voice["id"]] == "host"
    assert [v["id"] for v in httpx.get(fake_server.http + "/v1/voices").json()["data"]] == [voice["id"]]
    by_name = b"".join(client.text_to_speech.convert("host", text=TEXT, output_format="pcm_24000"))
    by_speaker = b"".join(client.text_to_speech.convert("5", text=TEXT, output_format="pcm_24000"))
    assert by_name == by_speaker


def test_the_sdk_key_is_checked_when_keys_are_set(settings_factory):
    """With CSM_API_KEYS set, the SDK's xi-api-key header is the key: the right one speaks, a wrong one is refused."""
    from csmserve.engine.fake import FakeEngine
    from support.servers import running_server

    with running_server(settings_factory(engine="fake", api_keys="k1"), FakeEngine()) as server:
        good = ElevenLabs(api_key="k1", base_url=server.http, timeout=30)
        assert b"".join(good.text_to_speech.convert("0", text="Hi.", output_format="pcm_24000"))
        bad = ElevenLabs(api_key="wrong", base_url=server.http, timeout=30)
        with pytest.raises(ApiError) as caught:
            b"".join(bad.text_to_speech.convert("0", text="Hi."))
        assert caught.value.status_code == 403


def test_a_generation_failure_is_a_500_in_elevenlabs_shape_without_internal_text(settings_factory):
    """The model raising: convert answers 500 generation_failed in ElevenLabs' detail shape (the SDK
    raises ApiError), with no internal exception text; the server keeps serving."""
    from csmserve.engine.fake import FakeEngine
    from support.servers import running_server

    with running_server(settings_factory(engine="fake"), FakeEngine(fail_at_frame=1)) as server:
        sdk = ElevenLabs(api_key="unused", base_url=server.http, timeout=30)
        with pytest.raises(ApiError) as caught:
            b"".join(sdk.text_to_speech.convert("0", text="This sentence will fail."))
        assert httpx.get(server.http + "/health", timeout=10).status_code == 200
    assert caught.value.status_code == 500
    assert caught.value.body["detail"]["status"] == "generation_failed"
    assert "injected" not in caught.value.body["detail"]["message"]
