"""OpenAI-compatible speech API: ``POST /v1/audio/speech`` and ``GET /v1/models``.

Tools built for OpenAI's TTS (the ``openai`` package, agent frameworks) work unchanged: audio
streams as it is generated, in mp3, opus, aac, flac, wav or pcm (24 kHz s16le), as raw bytes or as
server-sent events. ``voice`` takes a speaker id ("0".."9"), a registered voice (id or name), or
one of OpenAI's voice names, mapped to speaker ids (:data:`OPENAI_VOICES`). ``speed`` other than
1.0 is refused with a 400: CSM speaks at its own pace, and time-stretching would change the voice.
"""

from __future__ import annotations

import base64
import json
import logging
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from csmserve.audio.containers import RESPONSE_FORMATS, make_container_encoder
from csmserve.errors import CsmServeError, InvalidRequest, Overloaded
from csmserve.logs import request_id
from csmserve.pipeline import StreamStats, synthesis_request
from csmserve.protocol import parse_json_object, parse_options
from csmserve.server.streaming import guarded_stream

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
    try:
        fields = _voice_fields(body.get("voice"), state)
        options = parse_options({**fields, "seed": body.get("seed"), "request_id": request_id.get()}, state.limits, text)
        synth = synthesis_request(options, state.settings, state.voices)
    except InvalidRequest as exc:
        return openai_error(400, exc.message, "voice" if "voice" in exc.message else None)
    engine = state.engine
    if not engine.info.ready:
        return openai_error(503, "the model is still loading; retry when /health says healthy")
    encoder = make_container_encoder(response_format)
    stats = StreamStats(engine.sample_rate)

    async def audio_bytes():
        stream = engine.synthesize(synth)
        try:
            async for piece in stream:
                stats.samples += len(piece)
                data = encoder.encode(piece)
                if data:
                    if stats.first_audio is None:
                        stats.first_audio = time.monotonic()
                    yield data
            yield encoder.flush()
        finally:
            await stream.aclose()

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
        kind = "server_error" if exc.http_status >= 500 or isinstance(exc, Overloaded) else "invalid_request_error"
        headers = {"Retry-After": "1"} if exc.http_status in (429, 503) else None
        return JSONResponse(
            {"error": {**exc.to_dict(), "type": kind, "param": None}},
            status_code=exc.http_status, headers=headers,
        )
