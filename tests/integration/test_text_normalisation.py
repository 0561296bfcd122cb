"""Text normalisation on every speech route, through real servers and clients.

The fake engine's audio is a function of the text it receives, so a route's audio equal to the audio of
the spoken text shows that the spoken text reached the engine ("$42.50" as "forty-two dollars and fifty
cents"); turned off, the audio is that of the text as sent.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import openai
import pytest
import soundfile as sf
import websockets
from elevenlabs.client import ElevenLabs
from test_elevenlabs_ws import audio_of, el_url, receive_until_final, ws_generate_audio

from csmserve.audio.pcm import float_to_pcm16
from csmserve.engine import SynthesisRequest
from csmserve.text.normalize import normalize

WRITTEN = "Your total is $42.50, due 12/03; call 555-0123."
SPOKEN = normalize(WRITTEN).text
#: An LLM's tokens of WRITTEN and one more sentence, cut inside the price and the phone number.
TOKENS = ["Your total is $42", ".", "50, due 12/", "03; call 555-", "0123. ", "Thanks!"]


def spoken_pcm(server, text: str, speaker_id: int = 0) -> bytes:
    """The fake engine's PCM for ``text``, as one request (16-bit, 24 kHz)."""
    request = SynthesisRequest(text=text, speaker_id=speaker_id, max_audio_ms=90_000)
    return float_to_pcm16(server.engine.render(request)).tobytes()


async def seed_request(server, **message) -> bytes:
    """The audio /ws/generate sends for one generate message."""
    pcm = bytearray()
    async with websockets.connect(server.ws) as ws:
        await ws.send(json.dumps(message))
        while True:
            frame = await asyncio.wait_for(ws.recv(), 10)
            if isinstance(frame, bytes):
                pcm += frame
            else:
                done = json.loads(frame)
                assert "error" not in done, done
                return bytes(pcm)


# -- the seed protocol and /generate ----------------------------------------------------------------
async def test_a_generate_request_reaches_the_engine_spoken_unless_turned_off(fake_server):
    """/ws/generate: the price, date and phone number are spoken as words; "normalize": false sends them as written."""
    assert await seed_request(fake_server, text=WRITTEN) == spoken_pcm(fake_server, SPOKEN)
    assert await seed_request(fake_server, text=WRITTEN, normalize=False) == spoken_pcm(fake_server, WRITTEN)


async def test_a_bad_normalize_field_is_an_error_event(fake_server):
    """normalize must be a boolean: anything else is an invalid_request naming the field."""
    async with websockets.connect(fake_server.ws) as ws:
        await ws.send(json.dumps({"text": WRITTEN, "normalize": "no"}))
        event = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert event["error"]["code"] == "invalid_request" and "normalize must be true or false" in event["error"]["message"]


async def test_streamed_tokens_are_normalised_sentence_by_sentence_without_cutting_a_number(fake_server):
    """LLM tokens that cut "$42.50" and "555-0123" in two sound exactly like the spoken text streamed as written."""
    spoken = await ws_generate_audio(fake_server, TOKENS)
    assert spoken == await ws_generate_audio(fake_server, [SPOKEN + " Thanks!"], normalize=False)
    assert spoken != await ws_generate_audio(fake_server, TOKENS, normalize=False)


def test_generate_over_rest_speaks_the_spoken_text_unless_turned_off(fake_server):
    """POST /generate takes the same field: its WAV is the spoken text's audio, or the text's as sent."""
    for body, said in (({"text": WRITTEN}, SPOKEN), ({"text": WRITTEN, "normalize": False}, WRITTEN)):
        response = httpx.post(fake_server.http + "/generate", json=body, headers={"Accept": "audio/wav"}, timeout=30)
        assert response.status_code == 200
        samples, _ = sf.read(io.BytesIO(response.content), dtype="int16")
        assert samples.tobytes() == spoken_pcm(fake_server, said)


# -- OpenAI ----------------------------------------------------------------------------------------
def test_openai_speech_is_always_normalised(fake_server):
    """/v1/audio/speech has no switch: the engine gets the spoken text."""
    client = openai.OpenAI(base_url=fake_server.http + "/v1", api_key="unused")
    audio = client.audio.speech.create(model="tts-1", voice="3", input=WRITTEN, response_format="pcm")
    assert audio.content == spoken_pcm(fake_server, SPOKEN, speaker_id=3)


# -- ElevenLabs over HTTP --------------------------------------------------------------------------
@pytest.fixture
def elevenlabs(fake_server):
    return ElevenLabs(api_key="unused", base_url=fake_server.http, timeout=30)


def test_with_timestamps_aligns_the_text_as_sent_and_as_spoken(elevenlabs, fake_server):
    """convert_with_timestamps: the engine says the spoken text; alignment holds the text as sent,
    normalized_alignment the spoken text, both over the same audio."""
    result = elevenlabs.text_to_speech.convert_with_timestamps("0", text=WRITTEN, output_format="pcm_24000")
    assert base64.b64decode(result.audio_base_64) == spoken_pcm(fake_server, SPOKEN)
    assert "".join(result.alignment.characters) == WRITTEN
    assert "".join(result.normalized_alignment.characters) == SPOKEN
    assert result.alignment.character_end_times_seconds[-1] == result.normalized_alignment.character_end_times_seconds[-1]
    money = result.alignment.characters.index("$")
    said = "".join(result.normalized_alignment.characters).index("forty-two")
    assert result.alignment.character_start_times_seconds[money] == result.normalized_alignment.character_start_times_seconds[said]


def test_apply_text_normalization_off_speaks_and_aligns_the_text_as_sent(elevenlabs, fake_server):
    """apply_text_normalization="off" (the SDK's body field): the engine gets the text as sent and
    normalized_alignment equals alignment."""
    result = elevenlabs.text_to_speech.convert_with_timestamps(
        "0", text=WRITTEN, output_format="pcm_24000", apply_text_normalization="off"
    )
    assert base64.b64decode(result.audio_base_64) == spoken_pcm(fake_server, WRITTEN)
    assert result.normalized_alignment == result.alignment
    assert "".join(result.alignment.characters) == WRITTEN


def test_apply_text_normalization_also_comes_as_a_query_parameter(fake_server):
    """?apply_text_normalization=off works as the body field does; "auto" and "on" normalise; others are 422s."""
    url = fake_server.http + "/v1/text-to-speech/0?output_format=pcm_24000"
    assert httpx.post(url + "&apply_text_normalization=off", json={"text": WRITTEN}).content == spoken_pcm(fake_server, WRITTEN)
    for value in ("auto", "on"):
        body = {"text": WRITTEN, "apply_text_normalization": value}
        assert httpx.post(url, json=body).content == spoken_pcm(fake_server, SPOKEN)
    bad = httpx.post(url, json={"text": WRITTEN, "apply_text_normalization": "never"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "apply_text_normalization"]
    bad = httpx.post(url + "&apply_text_normalization=never", json={"text": WRITTEN})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "apply_text_normalization"]


def test_streamed_chunks_align_both_texts_exactly_once(elevenlabs):
    """stream_with_timestamps: the chunks' alignments put together hold the text as sent and its
    spoken form, each character once, in order."""
    text = WRITTEN + " Thanks!"
    chunks = list(elevenlabs.text_to_speech.stream_with_timestamps("0", text=text, output_format="pcm_24000"))
    written = "".join(c for chunk in chunks if chunk.alignment for c in chunk.alignment.characters)
    spoken = "".join(c for chunk in chunks if chunk.normalized_alignment for c in chunk.normalized_alignment.characters)
    assert written == text and spoken == SPOKEN + " Thanks!"
    assert sum(1 for chunk in chunks if chunk.alignment) > 4


# -- ElevenLabs' WebSockets -------------------------------------------------------------------------
async def elevenlabs_stream(server, fragments: list[str], **query) -> list[dict]:
    """Every message of one context that receives ``fragments``, then a flush and close_context."""
    async with websockets.connect(el_url(server, **query)) as ws:
        await ws.send(json.dumps({"text": " ", "context_id": "a"}))
        for fragment in fragments:
            await ws.send(json.dumps({"text": fragment, "context_id": "a"}))
        await ws.send(json.dumps({"context_id": "a", "flush": True}))
        await ws.send(json.dumps({"context_id": "a", "close_context": True}))
        return (await receive_until_final(ws, {"a"}))["a"]


def chars(messages: list[dict], key: str) -> str:
    return "".join(c for m in messages if m.get(key) for c in m[key]["chars"])


async def test_websocket_tokens_reach_the_engine_spoken_with_both_alignments(fake_server):
    """multi-stream-input, tokens cutting a price and a phone number: spoken like /ws/generate's stream
    of the spoken text; normalizedAlignment holds the spoken text, alignment the text as sent."""
    messages = await elevenlabs_stream(fake_server, TOKENS, auto_mode="true")
    assert audio_of(messages) == await ws_generate_audio(fake_server, [SPOKEN + " Thanks!"], normalize=False)
    assert chars(messages, "normalizedAlignment") == SPOKEN + " Thanks!"
    assert chars(messages, "alignment") == WRITTEN + " Thanks!"


async def test_websocket_normalisation_off_speaks_the_text_as_sent(fake_server):
    """apply_text_normalization=off on the socket's query: the text as sent, both alignments alike."""
    messages = await elevenlabs_stream(fake_server, TOKENS, auto_mode="true", apply_text_normalization="off")
    assert audio_of(messages) == await ws_generate_audio(fake_server, [WRITTEN + " Thanks!"], normalize=False)
    assert chars(messages, "normalizedAlignment") == chars(messages, "alignment") == WRITTEN + " Thanks!"


async def test_a_schedule_threshold_never_cuts_a_price_in_two(fake_server):
    """Without auto_mode, the chunk_length_schedule's threshold falls right after "$42.": the price
    waits for its cents and is said whole."""
    async with websockets.connect(el_url(fake_server)) as ws:
        await ws.send(json.dumps({"text": " ", "context_id": "a", "generation_config": {"chunk_length_schedule": [50]}}))
        await ws.send(json.dumps({"text": "Thank you for waiting, your order total comes to $42.", "context_id": "a"}))
        await ws.send(json.dumps({"text": "50 today.", "context_id": "a", "flush": True}))
        await ws.send(json.dumps({"context_id": "a", "close_context": True}))
        messages = (await receive_until_final(ws, {"a"}))["a"]
    assert "forty-two dollars and fifty cents today." in chars(messages, "normalizedAlignment")
