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
from csmserve.errors import CsmServeError, InvalidRequest, NotReady, Overloaded
from csmserve.logs import request_id
from csmserve.pipeline import StreamStats, synthesis_request
from csmserve.protocol import parse_json_object, parse_options
from csmserve.server.streaming import ClientGone, Slot, collected, guarded_stream

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1")

MODEL_IDS = ("csm-1b", "sesame/csm-1b", "tts-1", "tts-1-hd", "gpt-4o-mini-tts")
#: OpenAI's voice names -> CSM speaker ids (alphabetical order of OpenAI's list).
OPENAI_VOICES = {
    "alloy": 0, "ash": 1, "ballad": 2, "coral": 3, "echo": 4,
    "fable": 5, "nova": 6, "onyx": 7, "sage": 8, "shimmer": 9, "verse": 0,
}


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}},
        status_code=status,
    )


def _voice_fields(voice, state) -> dict:
    """Protocol fields (speaker_id or voice) for an OpenAI ``voice``."""
    if isinstance(voice, dict):
        voice = voice.get("id")
    if not isinstance(voice, str) or not voice:
        raise InvalidRequest("voice must be a speaker id (\"0\"-\"9\"), a registered voice, or an OpenAI voice name")
    if voice.isascii() and voice.isdigit() and len(voice) <= 4:
        return {"speaker_id": int(voice)}
    if state.voices.get(voice) is not None:
        return {"voice": voice}
    if voice.lower() in OPENAI_VOICES:
        return {"speaker_id": OPENAI_VOICES[voice.lower()]}
    raise InvalidRequest(
        f"unknown voice {voice!r}: use a speaker id (\"0\"-\"9\"), a registered voice (GET /v1/voices), "
        f"or one of {', '.join(OPENAI_VOICES)}"
    )


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
    state = request.app.state.csm
    try:
        body = parse_json_object((await request.body()).decode("utf-8", errors="replace"))
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
        options = parse_options({**fields, "seed": body.get("seed"), "request_id": request_id.get()}, state.limits, text)
        synth = synthesis_request(options, state.settings, state.voices)
    except InvalidRequest as exc:
        return openai_error(400, exc.message, "voice" if "voice" in exc.message else None)
    engine = state.engine
    if not engine.info.ready:
        return openai_error(503, NotReady.LOADING)
    encoder = make_container_encoder(response_format, whole_file=not streamed)
    stats = StreamStats(engine.sample_rate)

    async def audio_bytes():
        """The encoder's bytes as the audio arrives (a whole file's come at the end); raises CsmServeError."""
        stream = engine.synthesize(synth)
        try:
            async for piece in stream:
                stats.samples += len(piece)
                data = encoder.encode(piece)
                if data:
                    if stats.first_audio is None:
                        stats.first_audio = time.monotonic()
                    yield data
            tail = encoder.flush()
            if tail:
                if stats.first_audio is None:
                    stats.first_audio = time.monotonic()
                yield tail
        finally:
            await stream.aclose()

    if not streamed:  # a whole file: collected under the same rule, sent with its complete headers
        return await _whole_file(request, state, audio_bytes, encoder.media_type, stats)

    async def events():
        total = 0
        chunks = audio_bytes()
        try:
            async for data in chunks:
                total += len(data)
                payload = {"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")}
                yield f"data: {json.dumps(payload)}\n\n".encode()
        finally:
            await chunks.aclose()
        usage = {"input_tokens": len(text), "output_tokens": total, "total_tokens": len(text) + total}
        yield f"data: {json.dumps({'type': 'speech.audio.done', 'usage': usage})}\n\n".encode()

    body, media_type = (audio_bytes(), encoder.media_type) if stream_format == "audio" else (events(), "text/event-stream")
    try:
        return await guarded_stream(state, "openai", body, media_type, stats)
    except CsmServeError as exc:
        return _error(exc)


def _error(exc: CsmServeError) -> JSONResponse:
    """An engine or admission error in OpenAI's shape, so its SDK raises its usual exception."""
    kind = "server_error" if exc.http_status >= 500 or isinstance(exc, Overloaded) else "invalid_request_error"
    headers = {"Retry-After": "1"} if exc.http_status in (429, 503) else None
    return JSONResponse({"error": {**exc.to_dict(), "type": kind, "param": None}}, status_code=exc.http_status, headers=headers)


async def _whole_file(request: Request, state, audio_bytes, media_type: str, stats: StreamStats) -> Response:
    """The whole encoded file as one response (complete headers: FLAC STREAMINFO, WAV sizes, MP3's
    Xing frame), generated under the shared rule: admission (429), deadline, cancelled on disconnect."""
    try:
        slot = Slot(state, "openai")
    except Overloaded as exc:
        return _error(exc)
    parts: list[bytes] = []

    async def collect() -> None:
        async with contextlib.aclosing(audio_bytes()) as chunks:
            async for data in chunks:
                parts.append(data)

    failure = await collected(request, slot, collect, stats)
    if isinstance(failure, ClientGone):
        return Response(status_code=499)  # nobody reads it; the generation was cancelled
    if failure is not None:
        return _error(failure)
    return Response(b"".join(parts), media_type=media_type)
