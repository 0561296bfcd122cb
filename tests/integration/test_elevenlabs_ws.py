"""ElevenLabs' text-to-speech WebSockets, driven by a client written from ElevenLabs' API reference."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from urllib.parse import urlencode

import av
import numpy as np
import pytest
import websockets

from csmserve.audio.g711 import decode_ulaw
from csmserve.engine import SynthesisRequest
from csmserve.engine.fake import FakeEngine
from support.servers import running_server

FIRST = "Hello there, how are you today? I am fine, thank you."
SECOND = "The weather is nice. Let us go for a walk."


def el_url(server, voice="0", multi=True, **query) -> str:
    path = "multi-stream-input" if multi else "stream-input"
    params = urlencode({"output_format": "pcm_24000", **query})
    return f"ws://127.0.0.1:{server.port}/v1/text-to-speech/{voice}/{path}?{params}"


async def receive_until_final(ws, contexts: set[str | None]) -> dict[str | None, list[dict]]:
    """Every message, per contextId, until each context in ``contexts`` has sent isFinal."""
    messages: dict[str | None, list[dict]] = {}
    waiting = set(contexts)
    while waiting:
        message = json.loads(await asyncio.wait_for(ws.recv(), 10))
        cid = message.get("contextId")
        messages.setdefault(cid, []).append(message)
        assert "error" not in message, message
        if message.get("isFinal"):
            waiting.discard(cid)
    return messages


def audio_of(messages: list[dict]) -> bytes:
    return b"".join(base64.b64decode(m["audio"]) for m in messages if m.get("audio"))


async def ws_generate_audio(server, text: str | list[str], seed: int | None = None, **options) -> bytes:
    """What /ws/generate sends for ``text`` (or its fragments) streamed into one context with ``seed``
    and the stream's other ``options``."""
    pcm = bytearray()
    async with websockets.connect(server.ws) as ws:
        fragments = [text] if isinstance(text, str) else text
        await ws.send(json.dumps({"type": "text", "context_id": "x", "text": fragments[0], "seed": seed, **options}))
        for fragment in fragments[1:]:
            await ws.send(json.dumps({"type": "text", "context_id": "x", "text": fragment}))
        await ws.send(json.dumps({"type": "end", "context_id": "x"}))
        while True:
            message = await asyncio.wait_for(ws.recv(), 10)
            if isinstance(message, bytes):
                pcm += message
            elif json.loads(message).get("done"):
                return bytes(pcm)


async def test_two_interleaved_contexts_each_sound_like_ws_generate(fake_server):
    """Word by word into two contexts at once: each context's audio equals /ws/generate's bytes for its text."""
    async with websockets.connect(el_url(fake_server, auto_mode="true", seed=7)) as ws:
        await ws.send(json.dumps({"text": " ", "context_id": "a", "voice_settings": {"stability": 0.5}}))
        await ws.send(json.dumps({"text": " ", "context_id": "b", "generation_config": {"chunk_length_schedule": [50]}}))
        for word_a, word_b in zip(FIRST.split(), SECOND.split() + [""] * 10):
            await ws.send(json.dumps({"text": word_a + " ", "context_id": "a"}))
            if word_b:
                await ws.send(json.dumps({"text": word_b + " ", "context_id": "b"}))
        for cid in ("a", "b"):
            await ws.send(json.dumps({"context_id": cid, "flush": True}))
            await ws.send(json.dumps({"context_id": cid, "close_context": True}))
        messages = await receive_until_final(ws, {"a", "b"})
    assert audio_of(messages["a"]) == await ws_generate_audio(fake_server, FIRST, seed=7)
    assert audio_of(messages["b"]) == await ws_generate_audio(fake_server, SECOND, seed=7)
    assert messages["a"][-1] == {"isFinal": True, "contextId": "a"}


async def test_every_audio_message_carries_the_characters_it_speaks(fake_server):
    """Each audio message's alignment: its own characters, ms from its own start, filling its audio;
    together they are the text, once, over the whole audio (estimates, as the docs say)."""
    async with websockets.connect(el_url(fake_server, auto_mode="true")) as ws:
        await ws.send(json.dumps({"text": " ", "context_id": "a"}))
        await ws.send(json.dumps({"text": FIRST + " ", "context_id": "a", "flush": True}))
        await ws.send(json.dumps({"context_id": "a", "close_context": True}))
        messages = (await receive_until_final(ws, {"a"}))["a"]
    with_audio = [m for m in messages if m.get("audio")]
    assert len(with_audio) > 4 and all(m["alignment"] and m["alignment"]["chars"] for m in with_audio)
    aligned = [m for m in messages if m.get("alignment")]
    assert "".join(c for m in aligned for c in m["alignment"]["chars"]) == FIRST
    assert all(m["normalizedAlignment"] == m["alignment"] for m in aligned)  # nothing in FIRST to normalise
    for m in with_audio:
        starts, durations = m["alignment"]["charStartTimesMs"], m["alignment"]["charDurationsMs"]
        audio_ms = len(base64.b64decode(m["audio"])) / 2 / 24
        assert starts[0] == 0 and all(b == a + d for a, b, d in zip(starts, starts[1:], durations))
        assert abs(starts[-1] + durations[-1] - audio_ms) <= 1


async def test_close_context_stops_within_one_frame_and_leaves_the_other_context_alone(settings_factory):
    """Barge-in: close_context without flush stops its generation (at most one more frame), drops its queued
    sentences and sends isFinal; the other context's audio is complete."""
    engine = FakeEngine(frame_delay_s=0.02)
    long_text = " ".join(f"Sentence number {i} is here." for i in range(8)) + " "
    with running_server(settings_factory(engine="fake"), engine) as server:
        async with websockets.connect(el_url(server, auto_mode="true", seed=3)) as ws:
            await ws.send(json.dumps({"text": long_text, "context_id": "a"}))
            await ws.send(json.dumps({"text": SECOND + " ", "context_id": "b", "flush": True}))
            first = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert first["contextId"] in ("a", "b") and first["audio"]
            await ws.send(json.dumps({"context_id": "a", "close_context": True}))
            await ws.send(json.dumps({"context_id": "b", "close_context": True}))
            messages = await receive_until_final(ws, {"a", "b"})
            made = engine.frames_made["a"]
            await asyncio.sleep(0.3)
            assert engine.frames_made["a"] <= made + 1
            sentences = [f"Sentence number {i} is here." for i in range(8)]
            total = sum(engine.num_frames(SynthesisRequest(s, max_audio_ms=90_000)) for s in sentences)
            assert made < total
            assert messages["a"][-1] == {"isFinal": True, "contextId": "a"}
        expected_b = await ws_generate_audio(server, SECOND, seed=3)
    assert audio_of(messages["b"]) == expected_b


async def test_keep_alive_and_inactivity_timeout(fake_server):
    """Empty text keeps a context (and the socket) alive; after inactivity_timeout s of silence the server
    sends input_timeout_exceeded and closes with 1008."""
    async with websockets.connect(el_url(fake_server, inactivity_timeout=1)) as ws:
        await ws.send(json.dumps({"text": " ", "context_id": "a"}))
        for _ in range(3):
            await asyncio.sleep(0.5)
            await ws.send(json.dumps({"text": "", "context_id": "a"}))
        await ws.send(json.dumps({"text": "Still here. ", "context_id": "a", "flush": True}))
        got = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert got["contextId"] == "a" and got["audio"]
        while True:
            message = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if "error" in message:
                break
        assert message["error"] == "input_timeout_exceeded" and message["code"] == 1008
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd.code == 1008


async def test_close_socket_finishes_flushed_contexts_then_closes(fake_server):
    """close_socket: a flushed context is spoken to its end and isFinal, then the socket closes normally."""
    async with websockets.connect(el_url(fake_server)) as ws:
        await ws.send(json.dumps({"text": " ", "context_id": "a"}))
        await ws.send(json.dumps({"text": "Goodbye for now. ", "context_id": "a", "flush": True}))
        await ws.send(json.dumps({"close_socket": True}))
        messages = await receive_until_final(ws, {"a"})
        with pytest.raises(websockets.ConnectionClosedOK):
            await asyncio.wait_for(ws.recv(), 10)
    assert audio_of(messages["a"])


async def test_chunk_length_schedule_holds_text_until_enough_characters(fake_server):
    """Without auto_mode, nothing is spoken before the schedule's first threshold; try_trigger_generation
    speaks the complete sentence."""
    async with websockets.connect(el_url(fake_server)) as ws:
        await ws.send(json.dumps({"text": " ", "context_id": "a", "generation_config": {"chunk_length_schedule": [500]}}))
        await ws.send(json.dumps({"text": "Short one. And ", "context_id": "a"}))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 0.5)
        await ws.send(json.dumps({"text": "more", "context_id": "a", "try_trigger_generation": True}))
        first = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert first["contextId"] == "a"
        await ws.send(json.dumps({"context_id": "a", "flush": True}))
        await ws.send(json.dumps({"context_id": "a", "close_context": True}))
        messages = await receive_until_final(ws, {"a"})
    chars = "".join(c for m in [first, *messages["a"]] if m.get("alignment") for c in m["alignment"]["chars"])
    assert chars == "Short one. And more"


async def test_stream_input_single_context_ends_with_empty_text(fake_server):
    """stream-input: the first message opens, text streams, "" ends it: audio, then isFinal, then the socket closes."""
    async with websockets.connect(el_url(fake_server, multi=False, output_format="ulaw_8000", auto_mode="true")) as ws:
        await ws.send(json.dumps({"text": " ", "voice_settings": {"stability": 0.5, "similarity_boost": 0.8}}))
        for word in FIRST.split():
            await ws.send(json.dumps({"text": word + " "}))
        await ws.send(json.dumps({"text": ""}))
        messages = (await receive_until_final(ws, {None}))[None]
        with pytest.raises(websockets.ConnectionClosedOK):
            await asyncio.wait_for(ws.recv(), 10)
    assert messages[-1] == {"audio": None, "isFinal": True, "normalizedAlignment": None, "alignment": None}
    ulaw = audio_of(messages)
    expected_samples = sum(
        len(fake_server.engine.render(SynthesisRequest(s, max_audio_ms=90_000)))
        for s in ("Hello there, how are you today?", "I am fine, thank you.")
    )
    assert abs(len(ulaw) - expected_samples / 3) <= 2  # one byte per 8 kHz sample
    assert np.abs(decode_ulaw(np.frombuffer(ulaw, dtype=np.uint8)).astype(int)).max() > 1000


async def test_unknown_voice_is_refused_like_elevenlabs(fake_server):
    """An unknown voice_id: a voice_not_found error, then close 1008."""
    async with websockets.connect(el_url(fake_server, voice="21m00Tcm4TlvDq8ikWAM")) as ws:
        message = json.loads(await asyncio.wait_for(ws.recv(), 10))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    assert message["error"] == "voice_not_found" and message["code"] == 1008
    assert closed.value.rcvd.code == 1008


@pytest.mark.parametrize(
    "query, fragment",
    [({"output_format": "wav_44100"}, "output_format must be one of"), ({"inactivity_timeout": "0"}, "inactivity_timeout")],
)
async def test_bad_query_parameters_are_refused_with_an_error(fake_server, query, fragment):
    """A bad query parameter: an invalid_request error saying which, then close 1008."""
    async with websockets.connect(el_url(fake_server, **query)) as ws:
        message = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert message["error"] == "invalid_request" and fragment in message["message"]


@pytest.mark.parametrize(
    "bad",
    [
        "not json",
        json.dumps({"text": 5, "context_id": "a"}),
        json.dumps({"context_id": "a", "close_context": "yes"}),
        json.dumps({"text": " ", "context_id": "a", "generation_config": {"chunk_length_schedule": [10]}}),
        json.dumps({"text": "hi", "context_id": "a", "speed": 2}),
        json.dumps({"close_context": True}),
        b"\x00binary",
    ],
)
async def test_a_bad_message_is_an_error_and_nothing_is_lost(fake_server, bad):
    """A malformed message gets an invalid_input_message error; the socket stays open and text buffered before
    it is still spoken, whole."""
    async with websockets.connect(el_url(fake_server, auto_mode="true")) as ws:
        await ws.send(json.dumps({"text": "Hello there, how are you ", "context_id": "ok"}))
        await ws.send(bad)
        message = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert message["error"] == "invalid_input_message" and message["code"] == 1008
        await ws.send(json.dumps({"text": "today? I am fine, thank you.", "context_id": "ok", "flush": True}))
        await ws.send(json.dumps({"context_id": "ok", "close_context": True}))
        messages = await receive_until_final(ws, {"ok"})
    assert audio_of(messages["ok"]) == await ws_generate_audio(fake_server, FIRST, seed=0)


async def test_stream_input_bad_messages_are_errors_and_too_large_ones_too(settings_factory):
    """stream-input: a context_id, or a message over CSM_MAX_MESSAGE_BYTES, is an error; the stream goes on."""
    with running_server(settings_factory(engine="fake", max_message_bytes=1024), FakeEngine()) as server:
        async with websockets.connect(el_url(server, multi=False)) as ws:
            await ws.send(json.dumps({"text": " "}))
            await ws.send(json.dumps({"text": "Hi. ", "context_id": "x"}))
            assert "multi-stream-input" in json.loads(await asyncio.wait_for(ws.recv(), 10))["message"]
            await ws.send(json.dumps({"text": "x" * 2000}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["error"] == "message_too_large"
            await ws.send(json.dumps({"text": "Still speaking. "}))
            await ws.send(json.dumps({"text": ""}))
            messages = (await receive_until_final(ws, {None}))[None]
    assert len(audio_of(messages)) == 2 * len(server.engine.render(SynthesisRequest("Still speaking.", max_audio_ms=90_000)))


async def test_api_key_in_the_first_message_or_header(settings_factory):
    """With CSM_API_KEYS set: the xi-api-key header, the authorization query parameter or the first message's
    xi_api_key admits; a wrong key gets invalid_api_key and close 1008."""
    with running_server(settings_factory(engine="fake", api_keys="k1"), FakeEngine()) as server:
        async with websockets.connect(el_url(server), additional_headers={"xi-api-key": "k1"}) as ws:
            await ws.send(json.dumps({"text": "Hi. ", "context_id": "a", "flush": True}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["audio"]
        async with websockets.connect(el_url(server, multi=False)) as ws:
            await ws.send(json.dumps({"text": " ", "xi_api_key": "k1"}))
            await ws.send(json.dumps({"text": "Hi. ", "flush": True}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["audio"]
        async with websockets.connect(el_url(server, authorization="Bearer k1")) as ws:
            await ws.send(json.dumps({"text": "Hi. ", "context_id": "a", "flush": True}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["audio"]
        async with websockets.connect(el_url(server)) as ws:
            await ws.send(json.dumps({"text": " ", "context_id": "a", "xi_api_key": "wrong"}))
            message = json.loads(await asyncio.wait_for(ws.recv(), 10))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
        assert message["error"] == "invalid_api_key" and closed.value.rcvd.code == 1008


async def test_livekit_plugin_message_sequence_is_spoken(fake_server):
    """LiveKit's elevenlabs plugin: its URL (base_url with ws://, its query), an opening with empty voice_settings,
    each sentence flushed, then "" with flush and close_context: mp3 audio at 22.05 kHz, then isFinal."""
    query = (
        "model_id=eleven_turbo_v2_5&output_format=mp3_22050_32&enable_ssml_parsing=false&enable_logging=true"
        "&inactivity_timeout=180&apply_text_normalization=auto&sync_alignment=true&auto_mode=true"
    )
    url = fake_server.http.replace("http://", "ws://") + "/v1/text-to-speech/0/multi-stream-input?" + query
    async with websockets.connect(url, additional_headers={"xi-api-key": "unused"}) as ws:
        await ws.send(json.dumps({"text": " ", "voice_settings": {}, "context_id": "lk1"}))
        for sentence in ("Hello there, how are you today? ", "I am fine, thank you. "):
            await ws.send(json.dumps({"text": sentence, "context_id": "lk1", "flush": True}))
        await ws.send(json.dumps({"text": "", "context_id": "lk1", "flush": True}))
        await ws.send(json.dumps({"context_id": "lk1", "close_context": True}))
        messages = (await receive_until_final(ws, {"lk1"}))["lk1"]
    with av.open(io.BytesIO(audio_of(messages))) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        assert stream.rate == 22050
    expected = sum(
        len(fake_server.engine.render(SynthesisRequest(s, max_audio_ms=90_000)))
        for s in ("Hello there, how are you today?", "I am fine, thank you.")
    )
    assert samples / 22050 == pytest.approx(expected / 24000, abs=0.1)


async def test_a_full_server_refuses_a_context_with_1013(settings_factory):
    """When every stream slot is taken, a context that starts speaking gets too_many_concurrent_requests and 1013."""
    import httpx

    with running_server(settings_factory(engine="fake", max_streams=1), FakeEngine(frame_delay_s=0.05)) as server:
        long_text = " ".join(f"Sentence number {i} is here." for i in range(20))
        with httpx.stream("POST", server.http + "/v1/text-to-speech/0/stream", json={"text": long_text}) as held:
            assert held.status_code == 200
            async with websockets.connect(el_url(server)) as ws:
                await ws.send(json.dumps({"text": "Hello. ", "context_id": "a", "flush": True}))
                message = json.loads(await asyncio.wait_for(ws.recv(), 10))
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), 10)
            refused = httpx.post(server.http + "/v1/text-to-speech/0", json={"text": "Hi."})
        assert message["error"] == "too_many_concurrent_requests" and message["code"] == 1013
        assert closed.value.rcvd.code == 1013
        assert refused.status_code == 429 and refused.json()["detail"]["status"] == "too_many_concurrent_requests"
        assert httpx.post(server.http + "/v1/text-to-speech/0?output_format=pcm_24000", json={"text": "Hi."}).content


async def test_a_generation_failure_ends_its_context_with_an_error(settings_factory):
    """The model raising mid-sentence: an error naming the context, then its isFinal; the socket stays open."""
    with running_server(settings_factory(engine="fake"), FakeEngine(fail_at_frame=1)) as server:
        async with websockets.connect(el_url(server)) as ws:
            await ws.send(json.dumps({"text": "This sentence will fail. ", "context_id": "a", "flush": True}))
            await ws.send(json.dumps({"context_id": "a", "close_context": True}))
            messages = []
            while not messages or not messages[-1].get("isFinal"):
                messages.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
            await ws.send(json.dumps({"text": "", "context_id": "b"}))  # still open: a keep-alive is accepted
            await ws.send(json.dumps({"close_socket": True}))
            with pytest.raises(websockets.ConnectionClosedOK):
                await asyncio.wait_for(ws.recv(), 10)
    errors = [m for m in messages if "error" in m]
    assert [(e["error"], e["contextId"], e["code"]) for e in errors] == [("generation_failed", "a", 1011)]
    assert messages[-1] == {"isFinal": True, "contextId": "a"}


# -- a client spends only its own share (the rules of /ws/generate, from ws.py) ---------------------


async def closing_message(ws) -> tuple[dict, int]:
    """The message a refused socket gets, and the close code that follows it."""
    message = json.loads(await asyncio.wait_for(ws.recv(), 10))
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await asyncio.wait_for(ws.recv(), 10)
    return message, closed.value.rcvd.code


async def test_a_socket_that_never_sends_its_key_is_closed_at_the_auth_deadline(settings_factory):
    """No key in the header, the query or a first message: invalid_api_key and 1008 after
    CSM_AUTH_TIMEOUT_S, not after ElevenLabs' 20 s inactivity timeout; no audio was sent."""
    settings = settings_factory(engine="fake", api_keys="k1", auth_timeout_s=0.3)
    with running_server(settings, FakeEngine()) as server:
        async with websockets.connect(el_url(server, inactivity_timeout=180)) as ws:
            message, code = await closing_message(ws)
    assert message["error"] == "invalid_api_key" and code == 1008


async def test_at_most_max_unauthenticated_sockets_wait_for_their_key(settings_factory):
    """With CSM_MAX_UNAUTHENTICATED 1, a second socket without a key is refused with 1013 while the
    first waits; once the first presents its key, a new one may wait again."""
    settings = settings_factory(engine="fake", api_keys="k1", max_unauthenticated=1)
    with running_server(settings, FakeEngine()) as server:
        async with websockets.connect(el_url(server)) as waiting:
            async with websockets.connect(el_url(server)) as refused:
                message, code = await closing_message(refused)
            assert message["error"] == "overloaded" and code == 1013
            await waiting.send(json.dumps({"text": "Hi. ", "context_id": "a", "flush": True, "xi_api_key": "k1"}))
            assert json.loads(await asyncio.wait_for(waiting.recv(), 10))["audio"]
            async with websockets.connect(el_url(server)) as next_one:
                await next_one.send(json.dumps({"text": "Hi. ", "context_id": "b", "flush": True, "xi_api_key": "k1"}))
                assert json.loads(await asyncio.wait_for(next_one.recv(), 10))["audio"]


async def test_a_context_carries_at_most_max_stream_chars(settings_factory):
    """Text beyond CSM_MAX_STREAM_CHARS on one context is refused with max_character_limit_exceeded
    (naming the context); what came before is still spoken, and another context may speak."""
    with running_server(settings_factory(engine="fake", max_stream_chars=30), FakeEngine()) as server:
        async with websockets.connect(el_url(server)) as ws:
            await ws.send(json.dumps({"text": "Hello there. ", "context_id": "a"}))  # 13 characters
            await ws.send(json.dumps({"text": "This is far too much text. ", "context_id": "a"}))  # 40 in all
            refused = json.loads(await asyncio.wait_for(ws.recv(), 10))
            await ws.send(json.dumps({"context_id": "a", "flush": True}))
            await ws.send(json.dumps({"text": "Another one. ", "context_id": "b", "flush": True}))
            messages = await receive_until_final_after_close(ws, {"a", "b"})
    assert (refused["error"], refused["contextId"]) == ("max_character_limit_exceeded", "a")
    assert len(audio_of(messages["a"])) == 2 * len(server.engine.render(SynthesisRequest("Hello there.", max_audio_ms=90_000)))
    assert audio_of(messages["b"])


async def receive_until_final_after_close(ws, contexts: set[str]) -> dict[str | None, list[dict]]:
    for cid in contexts:
        await ws.send(json.dumps({"context_id": cid, "close_context": True}))
    return await receive_until_final(ws, contexts)


async def test_contexts_open_at_once_are_capped_by_the_smaller_limit(settings_factory):
    """CSM_MAX_CONTEXTS_PER_CONNECTION 2: a third open context is refused; ElevenLabs' own 5 caps a larger setting."""
    with running_server(settings_factory(engine="fake", max_contexts_per_connection=2), FakeEngine()) as server:
        async with websockets.connect(el_url(server)) as ws:
            for cid in ("a", "b", "c"):
                await ws.send(json.dumps({"text": " ", "context_id": cid}))
            refused = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert refused["error"] == "invalid_input_message" and "2 contexts" in refused["message"]
    with running_server(settings_factory(engine="fake", max_contexts_per_connection=50), FakeEngine()) as server:
        async with websockets.connect(el_url(server)) as ws:
            for cid in "abcdef":
                await ws.send(json.dumps({"text": " ", "context_id": cid}))
            refused = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert refused["error"] == "invalid_input_message" and "5 contexts" in refused["message"]


async def test_control_characters_in_a_context_id_never_reach_the_log(settings_factory, caplog):
    """A context id with a newline and an escape, on a failing generation: the log line that names it
    has them replaced; the client still gets its own id back, and no internal exception text."""
    caplog.set_level("WARNING", logger="csmserve.api.elevenlabs.websocket")
    cid = "evil\nFAKE LOG LINE\x1b[31m"
    with running_server(settings_factory(engine="fake"), FakeEngine(fail_at_frame=1)) as server:
        async with websockets.connect(el_url(server)) as ws:
            await ws.send(json.dumps({"text": "This sentence will fail. ", "context_id": cid, "flush": True}))
            error = json.loads(await asyncio.wait_for(ws.recv(), 10))
    lines = [r.getMessage() for r in caplog.records if r.name == "csmserve.api.elevenlabs.websocket"]
    assert error["contextId"] == cid and error["error"] == "generation_failed"
    assert "injected" not in error["message"]
    assert lines and all("\n" not in line and "\x1b" not in line for line in lines)
    assert any("evil?FAKE LOG LINE?[31m" in line for line in lines)


async def test_the_message_limit_counts_utf8_bytes_not_characters(settings_factory):
    """multi-stream-input: 400 euro signs (1,200 UTF-8 bytes, under 1,024 characters) pass
    CSM_MAX_MESSAGE_BYTES 1024 only as characters: message_too_large; the socket stays open."""
    with running_server(settings_factory(engine="fake", max_message_bytes=1024), FakeEngine()) as server:
        async with websockets.connect(el_url(server)) as ws:
            await ws.send(json.dumps({"text": "€" * 400, "context_id": "a"}, ensure_ascii=False))
            refused = json.loads(await asyncio.wait_for(ws.recv(), 10))
            await ws.send(json.dumps({"text": "Hi. ", "context_id": "a", "flush": True}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["audio"]
    assert refused["error"] == "message_too_large"
