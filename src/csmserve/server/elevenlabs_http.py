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
ones through :class:`Slot` and :func:`until_disconnect`.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from csmserve.elevenlabs.formats import ChunkedAudio, OutputFormat, parse_output_format
from csmserve.elevenlabs.messages import parse_seed
from csmserve.elevenlabs.text import http_alignment
from csmserve.engine import Continuation
from csmserve.errors import CsmServeError, InvalidRequest, NotReady, Overloaded
from csmserve.logs import request_id
from csmserve.pipeline import stream_audio, synthesis_request
from csmserve.protocol import parse_json_object, parse_options
from csmserve.server.elevenlabs_ws import voice_fields, voice_not_found
from csmserve.server.streaming import ClientGone, Slot, guarded_stream, outcome_of, until_disconnect
from csmserve.text.sentences import split_sentences

ENDPOINT = "elevenlabs"
router = APIRouter(prefix="/v1/text-to-speech")

#: A piece of the output: encoded bytes, and after each sentence its (text, start ms, duration ms).
Piece = tuple[bytes, tuple[str, float, float] | None]


def detail(status_code: int, status: str, message: str, **headers: str) -> JSONResponse:
    """An error in ElevenLabs' shape."""
    return JSONResponse({"detail": {"status": status, "message": message}}, status_code=status_code, headers=headers or None)


def invalid_field(where: str, name: str, message: str) -> JSONResponse:
    """A 422 in FastAPI's validation shape (what ElevenLabs' API answers for a bad field)."""
    return JSONResponse({"detail": [{"loc": [where, name], "msg": message, "type": "value_error"}]}, status_code=422)


class Speech:
    """One validated request, ready to speak."""

    def __init__(self, state, fields: dict, text: str, output: OutputFormat, seed: int | None, previous: str | None):
        self.state, self.fields, self.text, self.output = state, fields, text, output
        self.seed, self.previous = seed, previous

    def _context(self) -> list[dict] | None:
        """``previous_text`` as a text-only turn of the speaker (a registered voice's own speaker id)."""
        if not self.previous:
            return None
        speaker = self.fields.get("speaker_id")
        if speaker is None:
            voice = self.state.voices.get(self.fields["voice"])
            speaker = voice.speaker_id if voice is not None else 0  # deleted meanwhile: the request fails anyway
        return [{"speaker_id": speaker, "text": self.previous[: self.state.settings.max_text_chars]}]

    async def pieces(self) -> AsyncIterator[Piece]:
        """The audio as it is generated; raises :class:`CsmServeError`. Admission, deadline and
        disconnects are the caller's (:mod:`csmserve.server.streaming`); closing this closes the engine's stream."""
        state = self.state
        audio = ChunkedAudio(self.output, state.settings.default_chunk_ms)
        continuation = Continuation()
        for i, sentence in enumerate(split_sentences(self.text)):
            context = self._context() if i == 0 else None
            fields = {**self.fields, "seed": self.seed, "context": context, "request_id": request_id.get()}
            request = parse_options(fields, state.limits, sentence)
            synth = synthesis_request(request, state.settings, state.voices, continuation)
            start = audio.samples
            async with contextlib.aclosing(stream_audio(state.engine, synth, audio, finish=False)) as chunks:
                async for chunk in chunks:
                    yield chunk, None
            rate = state.engine.sample_rate
            spoken = (" " if i else "") + sentence
            yield audio.cut(), (spoken, 1000 * start / rate, 1000 * (audio.samples - start) / rate)
        yield audio.finish(), None


async def parse(request: Request, voice_id: str) -> Speech | JSONResponse:
    """The validated request, or the error response (nothing admitted yet)."""
    state = request.app.state.csm
    try:
        output = parse_output_format(request.query_params.get("output_format"))
    except InvalidRequest as exc:
        return invalid_field("query", "output_format", exc.message)
    latency = request.query_params.get("optimize_streaming_latency")
    if latency is not None and latency not in ("0", "1", "2", "3", "4"):
        return invalid_field("query", "optimize_streaming_latency", "must be an integer from 0 to 4")
    try:
        body = parse_json_object((await request.body()).decode("utf-8", errors="replace"))
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
    fields = voice_fields(voice_id, state)
    if fields is None:
        return detail(404, "voice_not_found", voice_not_found(voice_id))
    if not state.engine.info.ready:
        return detail(503, "service_unavailable", NotReady.LOADING, **{"Retry-After": "5"})
    return Speech(state, fields, text, output, seed, previous or None)


def failed(exc: CsmServeError) -> JSONResponse:
    """An admission or engine error in ElevenLabs' shape (its SDK raises its usual exception); a
    generation failure's internal text stays in the log (``to_dict``)."""
    headers = {"Retry-After": "1"} if exc.http_status in (429, 503) else {}
    status = "too_many_concurrent_requests" if isinstance(exc, Overloaded) else exc.code
    return detail(exc.http_status, status, exc.to_dict()["message"], **headers)


async def respond(voice_id: str, request: Request, *, streamed: bool, timestamps: bool) -> Response:
    """The four endpoints: the whole audio or a stream of it, raw or as JSON with character timings."""
    speech = await parse(request, voice_id)
    if isinstance(speech, Response):
        return speech
    if streamed:
        body = timed_lines(speech) if timestamps else audio_bytes(speech)
        media_type = "application/x-ndjson" if timestamps else speech.output.media_type
        try:
            return await guarded_stream(speech.state, ENDPOINT, body, media_type)
        except CsmServeError as exc:
            return failed(exc)
    return await whole_file(request, speech, timestamps)


async def whole_file(request: Request, speech: Speech, timestamps: bool) -> Response:
    """The whole audio (or its JSON with timings), generated under the shared rule: admission (429),
    deadline, cancelled on disconnect."""
    try:
        slot = Slot(speech.state, ENDPOINT)
    except Overloaded as exc:
        return failed(exc)
    audio, spans = bytearray(), []

    async def collect() -> None:
        async with contextlib.aclosing(speech.pieces()) as pieces:
            async for data, span in pieces:
                audio.extend(data)
                if span is not None:
                    spans.append(span)

    try:
        await until_disconnect(request, slot, collect)
    except ClientGone:
        slot.leave("disconnected")
        return Response(status_code=499)  # nobody reads it; the generation was cancelled
    except CsmServeError as exc:
        slot.leave(outcome_of(exc))
        return failed(exc)
    except BaseException:
        slot.leave("error")
        raise
    slot.leave("ok")
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
