"""REST fallback: ``POST /generate`` (JSON with a download URL, or the WAV itself) and ``GET /audio/<id>.wav``.

Validation is the WebSocket protocol's, so both paths accept and refuse the same requests.
"""

from __future__ import annotations

import contextlib

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from csmserve.audio.wav import pcm16_to_wav
from csmserve.errors import InvalidRequest, NotFound, NotReady, Overloaded
from csmserve.logs import request_id
from csmserve.pipeline import AudioOutput, StreamStats, stream_audio, synthesis_request
from csmserve.protocol import parse_generate, parse_json_object
from csmserve.server.streaming import ClientGone, Slot, collected

router = APIRouter()


def _wants_wav(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return any(part.split(";")[0].strip() in ("audio/wav", "audio/x-wav", "audio/wave") for part in accept.split(","))


@router.post("/generate")
async def generate(request: Request) -> Response:
    state = request.app.state.csm
    body = await request.body()
    try:
        data = parse_json_object(body.decode("utf-8", errors="replace"))
    except InvalidRequest as exc:
        return JSONResponse({"error": exc.to_dict()}, status_code=400)
    parsed = parse_generate(data, state.limits)
    engine = state.engine
    if not engine.info.ready:
        error = NotReady()
        return JSONResponse({"error": error.to_dict()}, status_code=503, headers={"Retry-After": "5"})
    if parsed.framing is not None:
        raise InvalidRequest("framing is for WebSocket streams; POST /generate returns a WAV file")
    request_id.set(parsed.request_id)
    stats = StreamStats(engine.sample_rate)
    pcm = bytearray()
    # 16-bit PCM at the requested rate; a G.711 format is applied by the WAV writer.
    as_pcm = {"chunk_ms": 1000, "format": "pcm_s16le"}
    output = AudioOutput(parsed.model_copy(update=as_pcm), stats)
    try:
        slot = Slot(state, "rest")
    except Overloaded as exc:
        return JSONResponse({"error": exc.to_dict()}, status_code=429, headers={"Retry-After": "1"})

    async def collect() -> None:
        synth = synthesis_request(parsed, state.settings, state.voices)
        async with contextlib.aclosing(stream_audio(engine, synth, output)) as chunks:
            async for chunk in chunks:
                pcm.extend(chunk)

    failure = await collected(request, slot, collect, stats)
    if isinstance(failure, ClientGone):
        return Response(status_code=499)  # nobody reads it; the generation was cancelled
    if failure is not None:
        headers = {"Retry-After": "1"} if failure.http_status in (429, 503) else None
        return JSONResponse({"error": failure.to_dict()}, status_code=failure.http_status, headers=headers)
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
        "duration_s": round(stats.samples / engine.sample_rate, 3),
        "samples": len(pcm) // 2,
        "bytes": stored.size,
        "expires_in_s": state.settings.audio_ttl_s,
    }
    if parsed.request_id is not None:
        body["request_id"] = parsed.request_id
    return JSONResponse(body)


@router.get("/audio/{name}")
async def download(name: str, request: Request) -> Response:
    store = request.app.state.csm.store
    audio_id = name[:-4] if name.endswith(".wav") else None
    item = store.get(audio_id) if audio_id else None
    if item is None:
        raise NotFound(f"no audio named {name[:64]!r}: unknown, or expired after {store.ttl_s:.0f} s")
    return Response(item.path.read_bytes(), media_type="audio/wav")
