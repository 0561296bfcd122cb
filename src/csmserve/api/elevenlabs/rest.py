"""ElevenLabs' HTTP text-to-speech: ``POST /v1/text-to-speech/{voice_id}`` and its ``/stream``,
``/with-timestamps`` and ``/stream/with-timestamps`` variants, as the ``elevenlabs`` SDK calls them.

The text is spoken sentence by sentence as one continuous stream (the same path as a WebSocket
context), each sentence normalised (numbers, dates, symbols as words) unless
``apply_text_normalization`` is ``"off"``; every chunk carries the characters it speaks, as sent
(``alignment``) and as spoken (``normalized_alignment``): estimates (:mod:`.alignment`). Body fields:
``text``; ``seed``; ``previous_text`` (CSM context, a text-only turn of the same speaker);
``apply_text_normalization`` (also as a query parameter); ``model_id``, ``voice_settings``,
``next_text``, ``language_code`` and the rest are accepted and ignored. Errors come in ElevenLabs' shapes:
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

from csmserve.api.elevenlabs.alignment import Aligned, StreamAligner
from csmserve.api.elevenlabs.formats import OutputFormat, output_sink, parse_output_format
from csmserve.api.elevenlabs.messages import parse_seed, parse_text_normalization, speech_request
from csmserve.api.elevenlabs.text import http_alignment, joined
from csmserve.api.elevenlabs.voices import voice_not_found, voice_of
from csmserve.errors import CsmServeError, InvalidRequest, NotReady, Overloaded
from csmserve.logs import request_id
from csmserve.server.payload import json_object
from csmserve.server.state import ServerState, state_of
from csmserve.server.streaming import collected, guarded_stream
from csmserve.speech import Turn
from csmserve.speech.spoken import spoken_sentences
from csmserve.speech.voices import VoiceChoice, speaker_of

ENDPOINT = "elevenlabs"
#: A valid body, shown in errors about bodies that are not one.
EXAMPLE = '{"text": "Hello there."}'
router = APIRouter(prefix="/v1/text-to-speech")

#: A piece of the output: encoded bytes, and the characters they speak (None: none).
Piece = tuple[bytes, Aligned | None]


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
        previous: str | None, normalize: bool = True, tenant: str | None = None,
    ):
        self.state, self.voice, self.text, self.output = state, voice, text, output
        self.seed, self.previous, self.normalize, self.tenant = seed, previous, normalize, tenant
        #: The stream's figures (the streamed response is paced by them).
        self.stats = state.speech.stats()

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
        audio = speech.sentences(output_sink(self.output, self.stats, self.state.settings.default_chunk_ms))
        aligner = StreamAligner(self.output)
        for i, sentence in enumerate(spoken_sentences(self.text, self.normalize)):
            context = self._context() if i == 0 else ()
            said = sentence.text.strip()
            request = speech_request(
                self.voice, said, seed=self.seed, request_id=request_id.get(), context=context, tenant=self.tenant
            )
            aligner.start(sentence)
            async with contextlib.aclosing(audio.speak(request)) as chunks:
                async for chunk in chunks:
                    yield chunk, aligner.chunk(chunk)
            cut = b"".join(audio.cut())
            yield cut, aligner.chunk(cut, last=True)
        tail = b"".join(audio.finish())
        yield tail, aligner.chunk(tail)


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
    where = "body" if "apply_text_normalization" in body else "query"
    try:
        value = body.get("apply_text_normalization", request.query_params.get("apply_text_normalization"))
        normalize = parse_text_normalization(value)
    except InvalidRequest as exc:
        return invalid_field(where, "apply_text_normalization", exc.message)
    voice = voice_of(voice_id, state.voices, state.settings)
    if voice is None:
        return detail(404, "voice_not_found", voice_not_found(voice_id))
    # Blank previous_text says nothing: no context turn (a text-only turn needs words).
    previous = previous if previous and previous.strip() else None
    return Speech(state, voice, text, output, seed, previous, normalize, state.tenant(request))


async def respond(voice_id: str, request: Request, *, streamed: bool, timestamps: bool) -> Response:
    """The four endpoints: the whole audio or a stream of it, raw or as JSON with character timings."""
    speech = await parse(request, voice_id)
    if isinstance(speech, Response):
        return speech
    if streamed:
        body = timed_lines(speech) if timestamps else audio_bytes(speech)
        media_type = "application/x-ndjson" if timestamps else speech.output.media_type
        return await guarded_stream(
            speech.state, ENDPOINT, body, media_type, error_response, speech.stats, tenant=speech.tenant
        )
    return await whole_file(request, speech, timestamps)


async def whole_file(request: Request, speech: Speech, timestamps: bool) -> Response:
    """The whole audio (or its JSON with timings), generated under the shared rule: admission (429),
    deadline, cancelled on disconnect."""
    audio, aligned = bytearray(), []

    async def collect() -> None:
        async with contextlib.aclosing(speech.pieces()) as pieces:
            async for data, chars in pieces:
                audio.extend(data)
                if chars is not None:
                    aligned.append(chars)

    failure = await collected(request, speech.state, ENDPOINT, collect, error_response, tenant=speech.tenant)
    if failure is not None:
        return failure
    if not timestamps:
        return Response(bytes(audio), media_type=speech.output.media_type)
    return JSONResponse(timed_chunk(bytes(audio), aligned))


def timed_chunk(audio: bytes, aligned: list[Aligned]) -> dict:
    """Audio with the characters it speaks, as sent (``alignment``) and as spoken (``normalized_alignment``)."""
    return {
        "audio_base64": base64.b64encode(audio).decode("ascii"),
        "alignment": http_alignment(joined(a.written for a in aligned)) if aligned else None,
        "normalized_alignment": http_alignment(joined(a.spoken for a in aligned)) if aligned else None,
    }


async def audio_bytes(speech: Speech) -> AsyncIterator[bytes]:
    async with contextlib.aclosing(speech.pieces()) as pieces:
        async for data, _ in pieces:
            if data:
                yield data


async def timed_lines(speech: Speech) -> AsyncIterator[bytes]:
    """One JSON object a line: each chunk with the characters it speaks (times from the start of the audio)."""
    async with contextlib.aclosing(speech.pieces()) as pieces:
        async for data, chars in pieces:
            if data or chars is not None:
                yield (json.dumps(timed_chunk(data, [chars] if chars else [])) + "\n").encode()


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
