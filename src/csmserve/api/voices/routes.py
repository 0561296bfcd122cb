"""The voice library's routes, in csmserve's shape and ElevenLabs':

* ``POST /v1/voices`` (csmserve: a clip, its transcript, a name) and ``POST /v1/voices/add``
  (ElevenLabs' instant voice cloning: ``files``, ``name``, ``description``, ``labels``; csmserve's
  ``transcript`` and ``speaker_id`` as extra fields) register a voice;
* ``GET /v1/voices`` lists them both ways (``data``: csmserve's registered voices; ``voices``:
  ElevenLabs' list, :mod:`.listing`), ``GET /v2/voices`` is ElevenLabs' search with its pagination;
* ``GET /v1/voices/{voice_id}`` shows any voice a client may name (speaker ids, mapped names,
  registered voices) with both shapes' fields; ``DELETE`` removes a registered voice.

Errors come in the client's shape: ElevenLabs' (``{"detail": {"status", "message"}}``) to a client
that sends ``xi-api-key`` and on ElevenLabs-only paths, csmserve's otherwise.

A voice is encoded with the model's own codec (Mimi) once, at registration, on the model worker;
requests that name it get its codes as CSM context, so nothing is re-encoded per request.
"""

from __future__ import annotations

import functools
import json
import logging

import anyio.to_thread
import numpy as np
from fastapi import APIRouter, Form, Request, UploadFile
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from csmserve.api.voices.listing import VoiceSearch, elevenlabs_voices, one_voice, validation_detail
from csmserve.audio.decode import decode_clip
from csmserve.errors import Conflict, CsmServeError, InvalidRequest, NotFound, NotReady, Overloaded
from csmserve.server.clients import speaks_elevenlabs
from csmserve.server.errors import error_response
from csmserve.server.state import ServerState, state_of
from csmserve.voices import Voice

log = logging.getLogger(__name__)
router = APIRouter()
#: Uploads that may wait for a decoder; more are refused with a 429.
MAX_WAITING_DECODES = 4
#: ElevenLabs' names for the errors it has; the others keep csmserve's code.
STATUS_NAMES = {
    Overloaded: "too_many_concurrent_requests", NotReady: "service_unavailable", NotFound: "voice_not_found",
    Conflict: "voice_name_taken",
}


def elevenlabs_error(exc: CsmServeError) -> JSONResponse:
    """``exc`` in ElevenLabs' shape, so its SDK raises its usual exception. A taken or reserved name is
    a 400, not csmserve's 409: the SDK retries a 409, and a retry cannot free the name."""
    status = STATUS_NAMES.get(type(exc), exc.code)
    body = {"detail": {"status": status, "message": exc.to_dict()["message"]}}
    code = 400 if isinstance(exc, Conflict) else exc.http_status
    return JSONResponse(body, status_code=code, headers=exc.headers() or None)


def refusal(request: Request, exc: CsmServeError) -> JSONResponse:
    """``exc`` in the shape of the client that sent ``request``."""
    return elevenlabs_error(exc) if speaks_elevenlabs(request) else error_response(exc)


async def read_upload(state: ServerState, upload: UploadFile) -> bytes:
    """An uploaded file's bytes, at most ``max_upload_bytes`` (the guard bounds the whole body too)."""
    limit = state.settings.max_upload_bytes
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise UploadTooLarge(f"uploads are limited to {limit} bytes")
    return data


class UploadTooLarge(InvalidRequest):
    code = "upload_too_large"
    http_status = 413


async def decode_off_loop(state: ServerState, data: bytes) -> np.ndarray:
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


async def register(
    state: ServerState, uploads: list[bytes], name: str, transcript: str, speaker_id: int,
    description: str = "", labels: dict[str, str] | None = None,
) -> Voice:
    """Check, decode (the clips one after another, as one clip) and encode a new voice, then store it.
    Raises :class:`CsmServeError` (a bad field or clip, a taken name, a busy or loading server)."""
    settings = state.settings
    name, transcript = state.voices.check_new(name, transcript, speaker_id, settings)
    clips = [await decode_off_loop(state, data) for data in uploads]
    clip = np.concatenate(clips)
    if len(clip) > settings.max_voice_seconds * state.engine.sample_rate:
        raise InvalidRequest(f"the clips are {len(clip) / state.engine.sample_rate:.1f} s together; "
                             f"voices accept at most {settings.max_voice_seconds:.0f} s")
    if not state.engine.info.ready:
        raise NotReady()
    codes = await state.engine.encode(clip)
    return state.voices.store.add(name, speaker_id, transcript, codes, description, labels)


@router.post("/v1/voices", status_code=201)
async def create_voice(
    request: Request,
    audio: UploadFile,
    transcript: str = Form(...),
    name: str = Form(...),
    speaker_id: int = Form(0),
) -> JSONResponse:
    """csmserve's registration: one clip and what it says, word for word."""
    state = state_of(request)
    if not transcript.strip():
        raise InvalidRequest(f"transcript must be 1 to {state.settings.max_text_chars} characters: what the clip says")
    voice = await register(state, [await read_upload(state, audio)], name, transcript, speaker_id)
    return JSONResponse(voice.public(), status_code=201)


def parse_labels(raw: str | None) -> dict[str, str]:
    """ElevenLabs' ``labels`` form field: a JSON object of strings (the SDK sends ``null`` for none)."""
    if raw is None or not raw.strip():
        return {}
    try:
        labels = json.loads(raw)
    except ValueError:
        raise InvalidRequest("labels must be a JSON object of strings, e.g. {\"accent\": \"british\"}", "labels") from None
    if labels is None:
        return {}
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise InvalidRequest("labels must be a JSON object of strings, e.g. {\"accent\": \"british\"}", "labels")
    return labels


@router.post("/v1/voices/add")
async def add_voice(
    request: Request,
    files: list[UploadFile],
    name: str = Form(...),
    description: str | None = Form(None),
    labels: str | None = Form(None),
    transcript: str = Form(""),
    speaker_id: int = Form(0),
) -> JSONResponse:
    """ElevenLabs' instant voice cloning: the samples, in order, become one reference clip;
    ``transcript`` (a csmserve field) is what they say. ``remove_background_noise`` is ignored."""
    state = state_of(request)
    try:
        uploads = [await read_upload(state, upload) for upload in files]
        voice = await register(
            state, uploads, name, transcript, speaker_id, (description or "").strip(), parse_labels(labels)
        )
    except CsmServeError as exc:
        return elevenlabs_error(exc)
    return JSONResponse({"voice_id": voice.id, "requires_verification": False})


@router.get("/v1/voices")
async def list_voices(request: Request) -> dict:
    """csmserve's list (``data``), and ElevenLabs' (``voices``: speaker ids, mapped names, registered voices)."""
    state = state_of(request)
    return {
        "object": "list",
        "data": [v.public() for v in state.voices.store.list()],
        "voices": elevenlabs_voices(state.voices, state.settings),
    }


@router.get("/v2/voices")
async def search_voices(request: Request) -> JSONResponse:
    """ElevenLabs' voice search: filters, sort and pages over the voices ElevenLabs' list shows."""
    state = state_of(request)
    try:
        query = VoiceSearch.parse(request.query_params)
    except ValidationError as exc:
        return JSONResponse({"detail": validation_detail(exc, "query")}, status_code=422)
    return JSONResponse(query.page(elevenlabs_voices(state.voices, state.settings)))


@router.get("/v1/voices/{voice_id}")
async def get_voice(voice_id: str, request: Request) -> JSONResponse:
    state = state_of(request)
    voice = one_voice(voice_id, state.voices, state.settings)
    if voice is None:
        return refusal(request, NotFound(f"no voice {voice_id[:64]!r}; list voices with GET /v1/voices"))
    return JSONResponse(voice)


@router.delete("/v1/voices/{voice_id}")
async def delete_voice(voice_id: str, request: Request) -> JSONResponse:
    """Remove a registered voice (by id or name); speaker ids and mapped names are not stored voices."""
    state = state_of(request)
    store = state.voices.store
    voice = store.get(voice_id)
    if voice is None or not store.delete(voice.id):
        if one_voice(voice_id, state.voices, state.settings) is not None:
            reason = InvalidRequest(f"{voice_id[:64]!r} is a speaker id or a name CSM_VOICE_MAP maps; only registered voices can be deleted")
            return refusal(request, reason)
        return refusal(request, NotFound(f"no voice {voice_id[:64]!r}; list voices with GET /v1/voices"))
    if state.voices.default in (voice.id, voice.name):
        log.warning("deleted voice %r is the default voice (CSM_DEFAULT_VOICE): requests that name no voice "
                    "fail until a voice of that name is registered again", voice.name)
    return JSONResponse({"id": voice.id, "object": "voice", "deleted": True, "status": "ok"})
