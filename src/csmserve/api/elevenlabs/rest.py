"""ElevenLabs' HTTP text-to-speech: ``POST /v1/text-to-speech/{voice_id}`` and its ``/stream``,
``/with-timestamps`` and ``/stream/with-timestamps`` variants, as the ``elevenlabs`` SDK calls them.

The text is spoken sentence by sentence as one continuous stream (the same path as a WebSocket
context), so each sentence's audio span is known for the character timings (estimates, spread over
the sentence's characters). Body fields: ``text``; ``seed``; ``previous_text`` (CSM context, a
text-only turn of the same speaker); ``model_id``, ``voice_settings``, ``next_text``,
``language_code`` and the rest are accepted and ignored. Errors come in ElevenLabs' shapes:
``{"detail": {"status", "message"}}``, and FastAPI's ``{"detail": [...]}`` with 422 for a bad field.

Every route follows the shared rule of :mod:`csmserve.server.streaming`: the streamed ones go through
:func:`guarded_stream` (admission, deadline, slow-reader cut, cancel on disconnect), the whole-file
ones through :func:`collected`.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from csmserve.api.elevenlabs.formats import OutputFormat, output_sink, parse_output_format
from csmserve.api.elevenlabs.messages import parse_seed, speech_request
from csmserve.api.elevenlabs.text import http_alignment
from csmserve.api.elevenlabs.voices import voice_not_found, voice_of
from csmserve.errors import CsmServeError, InvalidRequest, NotReady, Overloaded
from csmserve.logs import request_id
from csmserve.server.payload import json_object
from csmserve.server.state import ServerState, state_of
from csmserve.server.streaming import collected, guarded_stream
from csmserve.speech import Turn
from csmserve.speech.voices import VoiceChoice, speaker_of
from csmserve.text.sentences import split_sentences

ENDPOINT = "elevenlabs"
#: A valid body, shown in errors about bodies that are not one.
EXAMPLE = '{"text": "Hello there."}'
router = APIRouter(prefix="/v1/text-to-speech")

#: A piece of the output: encoded bytes, and after each sentence its (text, start ms, duration ms).
Piece = tuple[bytes, tuple[str, float, float] | None]


def detail(status_code: int, status: str, message: str, **headers: str) -> JSONResponse:
    """An error in ElevenLabs' shape."""
    return JSONResponse({"detail": {"status": status, "message": message}}, status_code=status_code, headers=headers or None)


def invalid_field(where: str, name: str, message: str) -> JSONResponse:
    """A 422 in FastAPI's validation shape (what ElevenLabs' API answers for a bad field)."""
    return JSONResponse({"detail": [{"loc": [where, name], "msg": message, "type": "value_error"}]}, status_code=422)


#: ElevenLabs' names for the errors it has; the others keep csmserve's code.
STATUS_NAMES = {Overloaded: "too_many_concurrent_requests", NotReady: "service_unavailable"}


def error_response(exc: CsmServeError) -> JSONResponse:
    """An admission or engine error in ElevenLabs' shape (its SDK raises its usual exception); a
    generation failure's internal text stays in the log (``to_dict``)."""
    status = STATUS_NAMES.get(type(exc), exc.code)
    return detail(exc.http_status, status, exc.to_dict()["message"], **exc.headers())


class Speech:
    """One validated request, ready to speak."""

    def __init__(
        self, state: ServerState, voice: VoiceChoice, text: str, output: OutputFormat, seed: int | None,
        previous: str | None, tenant: str | None = None,
    ):
        self.state, self.voice, self.text, self.output = state, voice, text, output
        self.seed, self.previous, self.tenant = seed, previous, tenant

    def _context(self) -> tuple[Turn, ...]:
        """``previous_text`` as a text-only turn of the speaker (a registered voice's own speaker id)."""
        if not self.previous:
            return ()
        speaker = speaker_of(self.voice, self.state.voices)
        return (Turn(speaker, self.previous[: self.state.settings.max_text_chars]),)

    async def pieces(self) -> AsyncIterator[Piece]:
        """The audio as it is generated; raises :class:`CsmServeError`. Admission, deadline and
        disconnects are the caller's (:mod:`csmserve.server.streaming`); closing this closes the engine's stream."""
        speech = self.state.speech
        audio = speech.sentences(output_sink(self.output, speech.stats(), self.state.settings.default_chunk_ms))
        for i, sentence in enumerate(split_sentences(self.text)):
            context = self._context() if i == 0 else ()
            request = speech_request(
                self.voice, sentence, seed=self.seed, request_id=request_id.get(), context=context, tenant=self.tenant
            )
            start = audio.stats.samples
            async with contextlib.aclosing(audio.speak(request)) as chunks:
                async for chunk in chunks:
                    yield chunk, None
            rate = speech.sample_rate
            spoken = (" " if i else "") + sentence
            yield b"".join(audio.cut()), (spoken, 1000 * start / rate, 1000 * (audio.stats.samples - start) / rate)
        yield b"".join(audio.finish()), None


async def parse(request: Request, voice_id: str) -> Speech | JSONResponse:
    """The validated request, or the error response (nothing admitted yet)."""
    state = state_of(request)
    try:
        output = parse_output_format(request.query_params.get("output_format"))
    except InvalidRequest as exc:
        return invalid_field("query", "output_format", exc.message)
    latency = request.query_params.get("optimize_streaming_latency")
    if latency is not None and latency not in ("0", "1", "2", "3", "4"):
        return invalid_field("query", "optimize_streaming_latency", "must be an integer from 0 to 4")
    try:
        body = json_object((await request.body()).decode("utf-8", errors="replace"), EXAMPLE)
    except InvalidRequest as exc:
        return invalid_field("body", "text", exc.message)
    text = body.get("text")
    if not isinstance(text, str) or not text.strip():
        return invalid_field("body", "text", "text is required: a non-empty string")
    limit = state.settings.max_text_chars
    if len(text) > limit:
        return detail(400, "max_character_limit_exceeded", f"text is {len(text)} characters; the limit is {limit}")
    previous = body.get("previous_text")
    if previous is not None and not isinstance(previous, str):
        return invalid_field("body", "previous_text", "previous_text must be a string or null")
    try:
        seed = parse_seed(body.get("seed"))
    except InvalidRequest as exc:
        return invalid_field("body", "seed", exc.message)
    voice = voice_of(voice_id, state.voices, state.settings)
    if voice is None:
        return detail(404, "voice_not_found", voice_not_found(voice_id))
    # Blank previous_text says nothing: no context turn (a text-only turn needs words).
    previous = previous if previous and previous.strip() else None
    return Speech(state, voice, text, output, seed, previous, state.tenant(request))


async def respond(voice_id: str, request: Request, *, streamed: bool, timestamps: bool) -> Response:
    """The four endpoints: the whole audio or a stream of it, raw or as JSON with character timings."""
    speech = await parse(request, voice_id)
    if isinstance(speech, Response):
        return speech
    if streamed:
        body = timed_lines(speech) if timestamps else audio_bytes(speech)
        media_type = "application/x-ndjson" if timestamps else speech.output.media_type
        return await guarded_stream(speech.state, ENDPOINT, body, media_type, error_response, tenant=speech.tenant)
    return await whole_file(request, speech, timestamps)


async def whole_file(request: Request, speech: Speech, timestamps: bool) -> Response:
    """The whole audio (or its JSON with timings), generated under the shared rule: admission (429),
    deadline, cancelled on disconnect."""
    audio, spans = bytearray(), []

    async def collect() -> None:
        async with contextlib.aclosing(speech.pieces()) as pieces:
            async for data, span in pieces:
                audio.extend(data)
                if span is not None:
                    spans.append(span)

    failure = await collected(request, speech.state, ENDPOINT, collect, error_response, tenant=speech.tenant)
    if failure is not None:
        return failure
    if not timestamps:
        return Response(bytes(audio), media_type=speech.output.media_type)
    return JSONResponse(timed_chunk(bytes(audio), spans))


def timed_chunk(audio: bytes, spans: list[tuple[str, float, float]]) -> dict:
    alignment = http_alignment(spans) if spans else None
    return {"audio_base64": base64.b64encode(audio).decode("ascii"), "alignment": alignment, "normalized_alignment": alignment}


async def audio_bytes(speech: Speech) -> AsyncIterator[bytes]:
    async with contextlib.aclosing(speech.pieces()) as pieces:
        async for data, _ in pieces:
            if data:
                yield data


async def timed_lines(speech: Speech) -> AsyncIterator[bytes]:
    """One JSON object a line; each sentence's last chunk carries its characters (times from the start)."""
    async with contextlib.aclosing(speech.pieces()) as pieces:
        async for data, span in pieces:
            if data or span is not None:
                yield (json.dumps(timed_chunk(data, [span] if span else [])) + "\n").encode()


@router.post("/{voice_id}")
async def convert(voice_id: str, request: Request) -> Response:
    return await respond(voice_id, request, streamed=False, timestamps=False)


@router.post("/{voice_id}/stream")
async def stream(voice_id: str, request: Request) -> Response:
    return await respond(voice_id, request, streamed=True, timestamps=False)


@router.post("/{voice_id}/with-timestamps")
async def convert_with_timestamps(voice_id: str, request: Request) -> Response:
    return await respond(voice_id, request, streamed=False, timestamps=True)


@router.post("/{voice_id}/stream/with-timestamps")
async def stream_with_timestamps(voice_id: str, request: Request) -> Response:
    return await respond(voice_id, request, streamed=True, timestamps=True)
