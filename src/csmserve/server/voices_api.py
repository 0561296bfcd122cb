"""``/v1/voices``: register a voice from a reference clip, list, show and delete voices.

A voice is encoded with the model's own codec (Mimi) once, at registration, on the model worker;
requests that name it get its codes as CSM context, so nothing is re-encoded per request.
"""

from __future__ import annotations

from fastapi import APIRouter, Form, Request, UploadFile
from fastapi.responses import JSONResponse

from csmserve.audio.decode import decode_clip
from csmserve.elevenlabs.voices import elevenlabs_voices
from csmserve.errors import InvalidRequest, NotFound, NotReady

router = APIRouter(prefix="/v1/voices")


@router.post("", status_code=201)
async def create_voice(
    request: Request,
    audio: UploadFile,
    transcript: str = Form(...),
    name: str = Form(...),
    speaker_id: int = Form(0),
) -> JSONResponse:
    state = request.app.state.csm
    settings = state.settings
    if not name.strip() or len(name) > 64:
        raise InvalidRequest("name must be 1 to 64 characters")
    if not transcript.strip() or len(transcript) > settings.max_text_chars:
        raise InvalidRequest(f"transcript must be 1 to {settings.max_text_chars} characters: what the clip says")
    if not settings.min_speaker_id <= speaker_id <= settings.max_speaker_id:
        raise InvalidRequest(
            f"speaker_id must be an integer from {settings.min_speaker_id} to {settings.max_speaker_id}"
        )
    data = await audio.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        return JSONResponse(
            {"error": {"code": "upload_too_large", "message": f"uploads are limited to {settings.max_upload_bytes} bytes"}},
            status_code=413,
        )
    clip = decode_clip(data, state.engine.sample_rate, settings.max_voice_seconds)
    if not state.engine.info.ready:
        raise NotReady("the model is still loading; retry when /health says healthy")
    codes = await state.engine.encode(clip)
    voice = state.voices.add(name.strip(), speaker_id, transcript.strip(), codes)
    return JSONResponse(voice.public(), status_code=201)


@router.get("")
async def list_voices(request: Request) -> dict:
    """csmserve's list (``data``), and ElevenLabs' (``voices``: speaker ids and registered voices)."""
    state = request.app.state.csm
    voices = state.voices.list()
    settings = state.settings
    return {
        "object": "list",
        "data": [v.public() for v in voices],
        "voices": elevenlabs_voices(voices, settings.min_speaker_id, settings.max_speaker_id),
    }


@router.get("/{voice_id}")
async def get_voice(voice_id: str, request: Request) -> dict:
    voice = request.app.state.csm.voices.get(voice_id)
    if voice is None:
        raise NotFound(f"no voice {voice_id[:64]!r}")
    return voice.public()


@router.delete("/{voice_id}")
async def delete_voice(voice_id: str, request: Request) -> dict:
    store = request.app.state.csm.voices
    voice = store.get(voice_id)
    if voice is None or not store.delete(voice.id):
        raise NotFound(f"no voice {voice_id[:64]!r}")
    return {"id": voice.id, "object": "voice", "deleted": True}
