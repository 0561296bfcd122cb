"""``/v1/voices``: register a voice from a reference clip, list, show and delete voices.

The list comes in csmserve's shape (``data``) and in ElevenLabs' (``voices``: CSM's speaker ids
first as "premade" voices "0".."9", then the registered voices as "cloned" ones), so that a
framework's voice picker, or the ElevenLabs SDK's ``voices.get_all()``, finds both.

A voice is encoded with the model's own codec (Mimi) once, at registration, on the model worker;
requests that name it get its codes as CSM context, so nothing is re-encoded per request.
"""

from __future__ import annotations

import functools

import anyio.to_thread
from fastapi import APIRouter, Form, Request, UploadFile
from fastapi.responses import JSONResponse

from csmserve.audio.decode import decode_clip
from csmserve.errors import Conflict, InvalidRequest, NotFound, NotReady, Overloaded
from csmserve.server.state import ServerState, state_of
from csmserve.speech.voices import reserved_name
from csmserve.voices import Voice, normalise_name

router = APIRouter(prefix="/v1/voices")
#: Uploads that may wait for a decoder; more are refused with a 429.
MAX_WAITING_DECODES = 4


@router.post("", status_code=201)
async def create_voice(
    request: Request,
    audio: UploadFile,
    transcript: str = Form(...),
    name: str = Form(...),
    speaker_id: int = Form(0),
) -> JSONResponse:
    state = state_of(request)
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
    name = normalise_name(name)  # NFKC; invisible characters and look-alike script mixes refused (400)
    if reserved_name(name):
        raise Conflict(f"{name!r} is reserved (an OpenAI voice name, a speaker id or a voice id); pick another name")
    if state.voices.get(name) is not None:
        raise Conflict(f"a voice named {name!r} exists already; pick another name or delete it first")
    clip = await decode_off_loop(state, data)
    if not state.engine.info.ready:
        raise NotReady()
    codes = await state.engine.encode(clip)
    voice = state.voices.add(name, speaker_id, transcript.strip(), codes)
    return JSONResponse(voice.public(), status_code=201)


async def decode_off_loop(state: ServerState, data: bytes):
    """Decode an upload in a worker thread, a few at a time (``state.decoders``); when that many are
    already waiting, a 429: decoding is bounded work, never on the event loop."""
    settings, limiter = state.settings, state.decoders
    if limiter.statistics().tasks_waiting >= MAX_WAITING_DECODES:
        raise Overloaded("too many voice uploads are being decoded; retry shortly")
    decode = functools.partial(
        decode_clip, data, state.engine.sample_rate, settings.max_voice_seconds,
        max_channels=settings.max_voice_channels, max_rate=settings.max_voice_sample_rate,
    )
    return await anyio.to_thread.run_sync(decode, limiter=limiter)


def elevenlabs_voices(voices: list[Voice], min_speaker_id: int, max_speaker_id: int) -> list[dict]:
    """The voices as ElevenLabs lists them: ``{"voice_id", "name", "category", "labels"}`` each."""
    speakers = [
        {"voice_id": str(i), "name": f"CSM speaker {i}", "category": "premade", "labels": {}}
        for i in range(min_speaker_id, max_speaker_id + 1)
    ]
    registered = [
        {"voice_id": v.id, "name": v.name, "category": "cloned", "labels": {"speaker_id": str(v.speaker_id)}}
        for v in voices
    ]
    return speakers + registered


@router.get("")
async def list_voices(request: Request) -> dict:
    """csmserve's list (``data``), and ElevenLabs' (``voices``: speaker ids and registered voices)."""
    state = state_of(request)
    voices = state.voices.list()
    settings = state.settings
    return {
        "object": "list",
        "data": [v.public() for v in voices],
        "voices": elevenlabs_voices(voices, settings.min_speaker_id, settings.max_speaker_id),
    }


@router.get("/{voice_id}")
async def get_voice(voice_id: str, request: Request) -> dict:
    voice = state_of(request).voices.get(voice_id)
    if voice is None:
        raise NotFound(f"no voice {voice_id[:64]!r}")
    return voice.public()


@router.delete("/{voice_id}")
async def delete_voice(voice_id: str, request: Request) -> dict:
    store = state_of(request).voices
    voice = store.get(voice_id)
    if voice is None or not store.delete(voice.id):
        raise NotFound(f"no voice {voice_id[:64]!r}")
    return {"id": voice.id, "object": "voice", "deleted": True}
