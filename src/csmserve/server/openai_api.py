"""OpenAI-compatible speech API: ``POST /v1/audio/speech`` and ``GET /v1/models``.

Tools built for OpenAI's TTS (the ``openai`` package, agent frameworks) work unchanged: audio in mp3,
opus, aac, flac, wav or pcm (24 kHz s16le), as one complete file (headers with the length: any reader,
libsndfile's included, reads it), or streamed as it is generated when the client reads a stream (the SDK's
``with_streaming_response``, ``"stream": true``, or server-sent events). ``voice`` takes a speaker id
("0".."9"), a registered voice (id or name), or one of OpenAI's voice names, mapped to speaker ids (:data:`OPENAI_VOICES`). ``speed`` other than
1.0 is refused with a 400: CSM speaks at its own pace, and time-stretching would change the voice.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from csmserve.audio.containers import RESPONSE_FORMATS, make_container_encoder
from csmserve.errors import CsmServeError, InvalidRequest, Overloaded
from csmserve.logs import request_id
from csmserve.api.seed.messages import Limits, parse_options
from csmserve.server.payload import json_object
from csmserve.server.state import ServerState, state_of
from csmserve.server.streaming import collected, guarded_stream
from csmserve.speech import AudioSink, SpeechRequest
from csmserve.speech.voices import SPEAKER_NAMES as OPENAI_VOICES
from csmserve.speech.voices import choose_voice

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1")
ENDPOINT = "openai"

#: A valid body, shown in errors about bodies that are not one.
EXAMPLE = '{"model": "tts-1", "input": "Hello", "voice": "alloy"}'
MODEL_IDS = ("csm-1b", "sesame/csm-1b", "tts-1", "tts-1-hd", "gpt-4o-mini-tts")


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}},
        status_code=status,
    )


def error_response(exc: CsmServeError) -> JSONResponse:
    """An engine or admission error in OpenAI's shape, so its SDK raises its usual exception."""
    kind = "server_error" if exc.http_status >= 500 or isinstance(exc, Overloaded) else "invalid_request_error"
    body = {"error": {**exc.to_dict(), "type": kind, "param": None}}
    return JSONResponse(body, status_code=exc.http_status, headers=exc.headers() or None)


def _voice_fields(voice, state: ServerState) -> dict:
    """Protocol fields (speaker_id or voice) for an OpenAI ``voice``."""
    if isinstance(voice, dict):
        voice = voice.get("id")
    if not isinstance(voice, str) or not voice:
        raise InvalidRequest("voice must be a speaker id (\"0\"-\"9\"), a registered voice, or an OpenAI voice name")
    choice = choose_voice(voice, state.voices, speaker_names=True)
    if choice is None:
        raise InvalidRequest(
            f"unknown voice {voice!r}: use a speaker id (\"0\"-\"9\"), a registered voice (GET /v1/voices), "
            f"or one of {', '.join(OPENAI_VOICES)}"
        )
    return {"speaker_id": choice.speaker_id} if choice.voice is None else {"voice": choice.voice}


#: The ``openai`` SDK marks a response it reads as a stream (``with_streaming_response``) with this header.
SDK_STREAM_HEADER = "x-stainless-raw-response"


def _wants_stream(request: Request, stream) -> bool | InvalidRequest:
    """Whether the client reads the audio as it is generated, rather than as one file.

    ``"stream": true|false`` in the body decides (a csmserve extension); without it, the ``openai`` SDK's
    ``with_streaming_response`` streams and everything else (``speech.create``, curl, a browser) gets a
    complete file.
    """
    if stream is not None:
        if not isinstance(stream, bool):
            return InvalidRequest("stream must be true or false")
        return stream
    return request.headers.get(SDK_STREAM_HEADER) == "stream"


@router.get("/models")
async def models() -> dict:
    created = int(time.time())
    return {
        "object": "list",
        "data": [{"id": m, "object": "model", "created": created, "owned_by": "csmserve"} for m in MODEL_IDS],
    }


@router.post("/audio/speech")
async def speech(request: Request):
    state = state_of(request)
    try:
        body = json_object((await request.body()).decode("utf-8", errors="replace"), EXAMPLE)
    except InvalidRequest as exc:
        return openai_error(400, exc.message)
    model = body.get("model")
    if model not in MODEL_IDS:
        return openai_error(400, f"model must be one of {', '.join(MODEL_IDS)}", "model")
    text = body.get("input")
    if not isinstance(text, str) or not text.strip():
        return openai_error(400, "input must be a non-empty string", "input")
    if len(text) > state.settings.max_text_chars:
        return openai_error(400, f"input is {len(text)} characters; the limit is {state.settings.max_text_chars}", "input")
    response_format = body.get("response_format", "mp3")
    if response_format not in RESPONSE_FORMATS:
        return openai_error(400, f"response_format must be one of {', '.join(RESPONSE_FORMATS)}", "response_format")
    speed = body.get("speed", 1.0)
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not 0.25 <= speed <= 4.0:
        return openai_error(400, "speed must be a number from 0.25 to 4.0", "speed")
    if speed != 1.0:
        return openai_error(400, "speed other than 1.0 is not supported: CSM speaks at its own pace", "speed")
    stream_format = body.get("stream_format", "audio")
    if stream_format not in ("audio", "sse"):
        return openai_error(400, "stream_format must be audio or sse", "stream_format")
    streamed = _wants_stream(request, body.get("stream"))
    if isinstance(streamed, InvalidRequest):
        return openai_error(400, streamed.message, "stream")
    streamed = streamed or stream_format == "sse"
    try:
        fields = _voice_fields(body.get("voice"), state)
        options = parse_options(
            {**fields, "seed": body.get("seed"), "request_id": request_id.get()}, Limits.from_settings(state.settings), text
        )
    except InvalidRequest as exc:
        return openai_error(400, exc.message, "voice" if "voice" in exc.message else None)
    encoder = make_container_encoder(response_format, whole_file=not streamed)
    sink = AudioSink(encoder, state.speech.stats())
    speech = options.to_speech_request()

    if not streamed:  # a whole file: collected under the same rule, sent with its complete headers
        return await _whole_file(request, state, speech, sink)

    async def events():
        total = 0
        async with contextlib.aclosing(state.speech.stream(speech, sink)) as chunks:
            async for data in chunks:
                total += len(data)
                payload = {"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")}
                yield f"data: {json.dumps(payload)}\n\n".encode()
        usage = {"input_tokens": len(text), "output_tokens": total, "total_tokens": len(text) + total}
        yield f"data: {json.dumps({'type': 'speech.audio.done', 'usage': usage})}\n\n".encode()

    if stream_format == "audio":
        body, media_type = state.speech.stream(speech, sink), encoder.media_type
    else:
        body, media_type = events(), "text/event-stream"
    return await guarded_stream(state, ENDPOINT, body, media_type, error_response, sink.stats)


async def _whole_file(request: Request, state: ServerState, speech: SpeechRequest, sink: AudioSink) -> Response:
    """The whole encoded file as one response (complete headers: FLAC STREAMINFO, WAV sizes, MP3's
    Xing frame), generated under the shared rule: admission (429), deadline, cancelled on disconnect."""
    parts: list[bytes] = []

    async def collect() -> None:
        async with contextlib.aclosing(state.speech.stream(speech, sink)) as chunks:
            async for data in chunks:
                parts.append(data)

    failure = await collected(request, state, ENDPOINT, collect, error_response, sink.stats)
    if failure is not None:
        return failure
    return Response(b"".join(parts), media_type=sink.media_type)
