"""The elevenlabs SDK's voice, model and account calls, each as its documentation shows it, against a
real server: voices.search, voices.get, voices.ivc.create, voices.delete, models.list, user.get and
user.subscription.get; and the openai SDK's models.list beside them."""

from __future__ import annotations

import httpx
import openai
import pytest
from elevenlabs.client import ElevenLabs
from elevenlabs.core.api_error import ApiError
from elevenlabs.errors import UnprocessableEntityError
from test_voices_and_context import clip
from test_voices_cli import spoken_as

from csmserve.engine.fake import FakeEngine
from support.servers import running_server

TEXT = "Hello there, this voice should stay the same."


@pytest.fixture
def server(settings_factory):
    """A server (fake engine) that maps the SDK's example voice id to a voice named rachel."""
    settings = settings_factory(engine="fake", voice_map="21m00Tcm4TlvDq8ikWAM=rachel")
    with running_server(settings, FakeEngine()) as running:
        running.wait_ready()
        yield running


@pytest.fixture
def client(server):
    return ElevenLabs(api_key="unused", base_url=server.http, timeout=30)


def clone(client: ElevenLabs, name: str, **kwargs) -> str:
    """voices.ivc.create as ElevenLabs documents it: a name and sample files; returns the voice id."""
    created = client.voices.ivc.create(name=name, files=[(f"{name}.wav", clip("WAV"), "audio/wav")], **kwargs)
    assert created.requires_verification is False
    return created.voice_id


def test_instant_voice_cloning_registers_a_voice_that_speaks(client, server):
    """ivc.create: a csmserve voice with its description, labels and (a csmserve field) transcript and
    speaker; text_to_speech speaks in it by its id and by its name."""
    voice_id = clone(
        client, "rachel", description="warm and calm", labels={"accent": "british"},
        request_options={"additional_body_parameters": {"transcript": "This is how I sound.", "speaker_id": "6"}},
    )
    shown = httpx.get(f"{server.http}/v1/voices/{voice_id}").json()
    assert (shown["name"], shown["transcript"], shown["speaker_id"]) == ("rachel", "This is how I sound.", 6)
    assert shown["description"] == "warm and calm" and shown["labels"] == {"accent": "british"}
    by_id = b"".join(client.text_to_speech.convert(voice_id, text=TEXT, output_format="pcm_24000"))
    assert by_id == spoken_as(server.engine, 6)
    mapped = b"".join(client.text_to_speech.convert("21m00Tcm4TlvDq8ikWAM", text=TEXT, output_format="pcm_24000"))
    assert mapped == by_id


def test_several_samples_become_one_clip_and_bad_ones_are_refused(client):
    """Two samples make one clip of both lengths; an unreadable one or a taken name is refused with
    ElevenLabs' error shape (the SDK raises ApiError)."""
    two = client.voices.ivc.create(name="pair", files=[("a.wav", clip("WAV")), ("b.flac", clip("FLAC"))])
    assert client.voices.get(two.voice_id).model_extra["frames"] in range(36, 39)  # 3 s at 12.5 Hz
    with pytest.raises(ApiError) as unreadable:
        client.voices.ivc.create(name="noise", files=[("n.wav", b"not audio")])
    assert unreadable.value.status_code == 422
    assert "cannot read the audio file" in unreadable.value.body["detail"]["message"]
    with pytest.raises(ApiError) as taken:
        client.voices.ivc.create(name="PAIR", files=[("a.wav", clip("WAV"))])
    assert taken.value.status_code == 400  # not 409: the SDK retries a 409
    assert taken.value.body["detail"]["status"] == "voice_name_taken"


def test_every_listed_voice_can_be_fetched(client):
    """voices.get answers for each voice get_all lists: speaker ids, mapped ids, registered voices."""
    clone(client, "rachel")
    listed = client.voices.get_all().voices
    assert {"3", "21m00Tcm4TlvDq8ikWAM"} <= {voice.voice_id for voice in listed}
    for voice in listed:
        fetched = client.voices.get(voice.voice_id)
        assert (fetched.voice_id, fetched.name, fetched.category) == (voice.voice_id, voice.name, voice.category)
    assert client.voices.get("3").name == "CSM speaker 3"
    assert client.voices.get("21m00Tcm4TlvDq8ikWAM").name == "rachel"
    with pytest.raises(ApiError) as missing:
        client.voices.get("nobody")
    assert missing.value.status_code == 404 and missing.value.body["detail"]["status"] == "voice_not_found"


def test_search_filters_sorts_and_pages(client):
    """voices.search: search terms, category, voice_type, labels, voice_ids, sort, and pages that follow
    next_page_token to the end with has_more and total_count."""
    ids = {name: clone(client, name, labels={"accent": accent}) for name, accent in
           (("zoe", "irish"), ("adam", "british"), ("maya", "british"))}
    assert [v.name for v in client.voices.search(search="ZO").voices] == ["zoe"]
    cloned = client.voices.search(category="cloned", sort="name", sort_direction="desc")
    assert [v.name for v in cloned.voices] == ["zoe", "maya", "adam"] and cloned.total_count == 3
    assert {v.voice_id for v in client.voices.search(voice_type="default", page_size=100).voices} == {str(i) for i in range(10)}
    assert [v.name for v in client.voices.search(accent="British", sort="created_at_unix").voices] == ["adam", "maya"]
    assert [v.voice_id for v in client.voices.search(voice_ids=[ids["maya"], "4"]).voices] == ["4", ids["maya"]]
    seen, token = [], None
    while True:
        page = client.voices.search(page_size=4, next_page_token=token, include_total_count=True)
        seen += [v.voice_id for v in page.voices]
        assert page.total_count == 13
        if not page.has_more:
            break
        token = page.next_page_token
    assert seen == [str(i) for i in range(10)] + [ids["zoe"], ids["adam"], ids["maya"]]
    with pytest.raises(UnprocessableEntityError):
        client.voices.search(page_size=500)


def test_delete_removes_a_registered_voice_only(client):
    """voices.delete: status ok and the voice is gone; a speaker id cannot be deleted."""
    voice_id = clone(client, "rachel")
    assert client.voices.delete(voice_id).status == "ok"
    with pytest.raises(ApiError) as gone:
        client.voices.get(voice_id)
    assert gone.value.status_code == 404
    with pytest.raises(ApiError) as speaker:
        client.voices.delete("3")
    assert speaker.value.status_code == 422 and "only registered voices" in speaker.value.body["detail"]["message"]


def test_models_answer_each_sdk_in_its_own_shape(client, server):
    """GET /v1/models: the elevenlabs SDK (xi-api-key) gets ElevenLabs' models, the openai SDK
    (Authorization: Bearer) OpenAI's list, from the same server."""
    models = client.models.list()
    assert [m.model_id for m in models] == ["csm-1b"]
    assert models[0].can_do_text_to_speech and models[0].maximum_text_length_per_request == 4096
    ids = {m.id for m in openai.OpenAI(base_url=server.http + "/v1", api_key="unused", max_retries=0).models.list()}
    assert {"csm-1b", "tts-1"} <= ids


def test_user_and_subscription_say_what_the_server_is(client):
    """user.get and user.subscription.get parse; the subscription counts the registered voices."""
    clone(client, "rachel")
    user = client.user.get()
    assert user.user_id == "csmserve" and user.subscription.tier == "csmserve"
    subscription = client.user.subscription.get()
    assert subscription.voice_slots_used == 1 and subscription.can_use_instant_voice_cloning


def test_every_new_route_checks_the_key(settings_factory):
    """With CSM_API_KEYS set, search, get, ivc.create, delete, models and user refuse a wrong key (403)
    and answer the right one."""
    with running_server(settings_factory(engine="fake", api_keys="k1"), FakeEngine()) as server:
        server.wait_ready()
        good = ElevenLabs(api_key="k1", base_url=server.http, timeout=30)
        bad = ElevenLabs(api_key="wrong", base_url=server.http, timeout=30)
        voice_id = clone(good, "rachel")
        calls = [
            lambda c: c.voices.search(), lambda c: c.voices.get("3"), lambda c: c.models.list(),
            lambda c: c.user.get(), lambda c: c.user.subscription.get(),
            lambda c: c.voices.ivc.create(name="x", files=[("a.wav", clip("WAV"))]),
            lambda c: c.voices.delete(voice_id),
        ]
        for call in calls:
            with pytest.raises(ApiError) as refused:
                call(bad)
            assert refused.value.status_code == 403
            call(good)


def test_a_cloning_upload_above_the_limit_is_a_413(settings_factory):
    """ivc.create's samples count against CSM_MAX_UPLOAD_BYTES like any upload: a 413, nothing stored."""
    with running_server(settings_factory(engine="fake", max_upload_bytes=4096), FakeEngine()) as server:
        server.wait_ready()
        client = ElevenLabs(api_key="unused", base_url=server.http, timeout=30)
        with pytest.raises(ApiError) as refused:
            clone(client, "rachel")
        assert refused.value.status_code == 413
        assert httpx.get(server.http + "/v1/voices").json()["data"] == []
