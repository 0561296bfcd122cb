"""OpenAI-compatible speech API: ``POST /v1/audio/speech`` and ``GET /v1/models``.

Tools built for OpenAI's TTS (the ``openai`` package, agent frameworks) work unchanged: audio in mp3,
opus, aac, flac, wav or pcm (24 kHz s16le), as one complete file (headers with the length: any reader,
libsndfile's included, reads it), or streamed as it is generated when the client reads a stream (the SDK's
``with_streaming_response``, ``"stream": true``, or server-sent events). ``voice`` takes a speaker id
("0".."9"), a registered voice (id or name), a name the operator mapped to one, ``default``, or one of
OpenAI's voice names, mapped to speaker ids (:data:`~csmserve.speech.voices.SPEAKER_NAMES`); left out,
the server's default voice. ``speed`` other than 1.0 is refused with a 400: CSM
speaks at its own pace, and time-stretching would change the voice. The body is
:class:`~csmserve.api.openai.messages.SpeechBody`; errors come in OpenAI's shape (:func:`error_response`).
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from csmserve.api.openai.messages import MODEL_IDS, SpeechBody
from csmserve.audio.containers import make_container_encoder
from csmserve.errors import CsmServeError, InvalidRequest, Overloaded
from csmserve.logs import request_id
from csmserve.server.clients import OtherClientsRoute
from csmserve.server.state import ServerState, state_of
from csmserve.server.streaming import collected, guarded_stream
from csmserve.speech import AudioSink, SpeechRequest

router = APIRouter(prefix="/v1")
ENDPOINT = "openai"
#: The ``openai`` SDK marks a response it reads as a stream (``with_streaming_response``) with this header.
SDK_STREAM_HEADER = "x-stainless-raw-response"


def error_response(exc: CsmServeError, status: int | None = None) -> JSONResponse:
    """``exc`` in OpenAI's shape, so its SDK raises its usual exception. ``status`` 400: a parameter
    OpenAI would refuse (named in ``param``, no ``code``), as OpenAI answers every invalid parameter."""
    if status is not None and isinstance(exc, InvalidRequest):
        error = {"message": exc.message, "type": "invalid_request_error", "param": exc.field, "code": None}
        return JSONResponse({"error": error}, status_code=status)
    kind = "server_error" if exc.http_status >= 500 or isinstance(exc, Overloaded) else "invalid_request_error"
    body = {"error": {**exc.to_dict(), "type": kind, "param": None}}
    return JSONResponse(body, status_code=exc.http_status, headers=exc.headers() or None)


def wants_stream(request: Request, body: SpeechBody) -> bool:
    """Whether the client reads the audio as it is generated, rather than as one file.

    ``"stream": true|false`` in the body decides (a csmserve extension); without it, the ``openai`` SDK's
    ``with_streaming_response`` streams and everything else (``speech.create``, curl, a browser) gets a
    complete file. Server-sent events always stream.
    """
    if body.stream_format == "sse":
        return True
    if body.stream is not None:
        return body.stream
    return request.headers.get(SDK_STREAM_HEADER) == "stream"


async def models() -> dict:
    """OpenAI's model list; an ElevenLabs client (``xi-api-key``) gets ElevenLabs' at the same path."""
    created = int(time.time())
    return {
        "object": "list",
        "data": [{"id": m, "object": "model", "created": created, "owned_by": "csmserve"} for m in MODEL_IDS],
    }


router.add_api_route("/models", models, methods=["GET"], route_class_override=OtherClientsRoute)


@router.post("/audio/speech")
async def speech(request: Request) -> Response:
    state = state_of(request)
    raw = (await request.body()).decode("utf-8", errors="replace")
    try:
        body = SpeechBody.parse(raw, state.settings, state.voices)
    except InvalidRequest as exc:
        return error_response(exc, status=400)
    streamed = wants_stream(request, body)
    encoder = make_container_encoder(body.response_format, whole_file=not streamed)
    sink = AudioSink(encoder, state.speech.stats())
    spoken = body.to_speech_request(request_id.get(), state.tenant(request))
    if not streamed:  # a whole file: collected under the same rule, sent with its complete headers
        return await whole_file(request, state, spoken, sink)
    if body.stream_format == "audio":
        chunks, media_type = state.speech.stream(spoken, sink), encoder.media_type
    else:
        chunks, media_type = events(state, spoken, sink, len(body.input)), "text/event-stream"
    return await guarded_stream(state, ENDPOINT, chunks, media_type, error_response, sink.stats, spoken.tenant)


async def events(state: ServerState, spoken: SpeechRequest, sink: AudioSink, text: int) -> AsyncIterator[bytes]:
    """The audio as server-sent events: ``speech.audio.delta`` (base64), then ``speech.audio.done`` with
    usage (``text``: the input's characters)."""
    total = 0
    async with contextlib.aclosing(state.speech.stream(spoken, sink)) as chunks:
        async for data in chunks:
            total += len(data)
            payload = {"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")}
            yield f"data: {json.dumps(payload)}\n\n".encode()
    usage = {"input_tokens": text, "output_tokens": total, "total_tokens": text + total}
    yield f"data: {json.dumps({'type': 'speech.audio.done', 'usage': usage})}\n\n".encode()


async def whole_file(request: Request, state: ServerState, spoken: SpeechRequest, sink: AudioSink) -> Response:
    """The whole encoded file as one response (complete headers: FLAC STREAMINFO, WAV sizes, MP3's
    Xing frame), generated under the shared rule: admission (429), deadline, cancelled on disconnect."""
    parts: list[bytes] = []

    async def collect() -> None:
        async with contextlib.aclosing(state.speech.stream(spoken, sink)) as chunks:
            async for data in chunks:
                parts.append(data)

    failure = await collected(request, state, ENDPOINT, collect, error_response, sink.stats, spoken.tenant)
    if failure is not None:
        return failure
    return Response(b"".join(parts), media_type=sink.media_type)
