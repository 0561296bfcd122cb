"""REST fallback: ``POST /generate`` (JSON with a download URL, or the WAV itself) and ``GET /audio/<id>.wav``.

Validation is the WebSocket protocol's, so both paths accept and refuse the same requests.
"""

from __future__ import annotations

import contextlib

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from csmserve.api.seed.messages import Limits, parse_generate, parse_json_object
from csmserve.audio.wav import pcm16_to_wav
from csmserve.errors import InvalidRequest, NotFound
from csmserve.logs import request_id
from csmserve.server.errors import error_response
from csmserve.server.state import state_of
from csmserve.server.streaming import collected

router = APIRouter()
ENDPOINT = "rest"


def _wants_wav(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return any(part.split(";")[0].strip() in ("audio/wav", "audio/x-wav", "audio/wave") for part in accept.split(","))


@router.post("/generate")
async def generate(request: Request) -> Response:
    state = state_of(request)
    body = await request.body()
    try:
        data = parse_json_object(body.decode("utf-8", errors="replace"))
    except InvalidRequest as exc:
        return error_response(exc, status=400)
    parsed = parse_generate(data, Limits.from_settings(state.settings))
    if parsed.framing is not None:
        raise InvalidRequest("framing is for WebSocket streams; POST /generate returns a WAV file")
    request_id.set(parsed.request_id)
    # 16-bit PCM at the requested rate; a G.711 format is applied by the WAV writer.
    sink = parsed.model_copy(update={"chunk_ms": 1000, "format": "pcm_s16le"}).output_sink(state.speech.stats())
    pcm = bytearray()
    tenant = state.tenant(request)

    async def collect() -> None:
        async with contextlib.aclosing(state.speech.stream(parsed.to_speech_request(tenant), sink)) as chunks:
            async for chunk in chunks:
                pcm.extend(chunk)

    failure = await collected(request, state, ENDPOINT, collect, error_response, sink.stats, tenant)
    if failure is not None:
        return failure
    wav = pcm16_to_wav(bytes(pcm), parsed.sample_rate, parsed.format)
    if _wants_wav(request):
        return Response(wav, media_type="audio/wav")
    stored = state.store.put(wav)
    body = {
        "id": stored.id,
        "url": f"/audio/{stored.id}.wav",
        "format": "wav",
        "encoding": parsed.format,
        "sample_rate": parsed.sample_rate,
        "duration_s": round(sink.stats.samples / state.speech.sample_rate, 3),
        "samples": len(pcm) // 2,
        "bytes": stored.size,
        "expires_in_s": state.settings.audio_ttl_s,
    }
    if parsed.request_id is not None:
        body["request_id"] = parsed.request_id
    return JSONResponse(body)


@router.get("/audio/{name}")
async def download(name: str, request: Request) -> Response:
    store = state_of(request).store
    audio_id = name[:-4] if name.endswith(".wav") else None
    item = store.get(audio_id) if audio_id else None
    if item is None:
        raise NotFound(f"no audio named {name[:64]!r}: unknown, or expired after {store.ttl_s:.0f} s")
    return Response(item.path.read_bytes(), media_type="audio/wav")
