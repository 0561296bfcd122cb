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
import json
import logging
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from csmserve.audio.containers import RESPONSE_FORMATS, make_container_encoder
from csmserve.errors import CsmServeError, DeadlineExceeded, InvalidRequest, Overloaded
from csmserve.pipeline import StreamStats, deadline, synthesis_request
from csmserve.protocol import parse_json_object, parse_options

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
        options = parse_options({**fields, "seed": body.get("seed")}, state.limits, text)
        synth = synthesis_request(options, state.settings, state.voices)
    except InvalidRequest as exc:
        return openai_error(400, exc.message, "voice" if "voice" in exc.message else None)
    engine = state.engine
    if not engine.info.ready:
        return openai_error(503, "the model is still loading; retry when /health says healthy")
    encoder = make_container_encoder(response_format, whole_file=not streamed)
    try:
        state.enter("openai")
    except Overloaded as exc:
        return JSONResponse(
            {"error": {"message": exc.message, "type": "server_error", "param": None, "code": exc.code}},
            status_code=429, headers={"Retry-After": "1"},
        )
    stats = StreamStats(engine.sample_rate)

    async def encoded():
        """The encoder's bytes as the audio arrives; raises CsmServeError; ``state`` is the caller's."""
        stream = engine.synthesize(synth)
        try:
            with deadline(state.settings.request_timeout_s):
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

    if not streamed:
        outcome = "disconnected"  # unless it completes or fails below
        try:
            whole = b"".join([data async for data in encoded()])
            outcome = "ok"
        except CsmServeError as exc:
            outcome = "timeout" if isinstance(exc, DeadlineExceeded) else "error"
            return JSONResponse(
                {"error": {"message": exc.message, "type": "server_error", "param": None, "code": exc.code}},
                status_code=exc.http_status,
            )
        finally:
            state.leave()
            state.metrics.finished("openai", outcome, stats)
        return Response(whole, media_type=encoder.media_type)

    async def audio_bytes():
        outcome = "disconnected"
        try:
            async for data in encoded():
                yield data
            outcome = "ok"
        except DeadlineExceeded as exc:
            outcome = "timeout"
            log.warning("speech request stopped: %s", exc.message)
        except CsmServeError as exc:  # headers are sent: end the stream and say why in the log
            outcome = "error"
            log.warning("speech request failed mid-stream: %s", exc.message)
        finally:
            state.leave()
            state.metrics.finished("openai", outcome, stats)

    if stream_format == "audio":
        return StreamingResponse(audio_bytes(), media_type=encoder.media_type)

    async def events():
        total = 0
        async for data in audio_bytes():
            total += len(data)
            payload = {"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")}
            yield f"data: {json.dumps(payload)}\n\n"
        usage = {"input_tokens": len(text), "output_tokens": total, "total_tokens": len(text) + total}
        yield f"data: {json.dumps({'type': 'speech.audio.done', 'usage': usage})}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
