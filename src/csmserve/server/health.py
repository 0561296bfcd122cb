"""``/health``: the seed's fields first, then what an operator wants to know about the model."""

from __future__ import annotations

from pathlib import PurePath

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from csmserve.server.auth import presented_key

router = APIRouter()

OFFLINE_VOICE = "offline model: random weights, the audio is noise"


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    state = request.app.state.csm
    info = state.engine.info
    stalled = state.watchdog.stalled()
    if info.ready and not info.failed and stalled is None:
        status, code = "healthy", 200
    elif state.load_error is not None or info.failed:
        status, code = "failed", 503
    elif stalled is not None:
        status, code = "stalled", 503
    else:
        status, code = "loading", 503
    body = {
        "status": status,
        "device": info.device,
        "cuda": info.device.startswith("cuda"),
        "model_loaded": info.ready,
        "endpoints": {"websocket": "/ws/generate", "rest": "/generate"},
        "model": info.model if trusted(request, state) else _without_path(info.model),
        "dtype": info.dtype,
        "engine": info.name,
        "offline_model": info.offline_model,
        "voice": OFFLINE_VOICE if info.offline_model else "real",
        "sample_rate": state.engine.sample_rate,
        **info.extra,
    }
    if state.load_error is not None:
        body["error"] = state.load_error.to_dict()
    elif info.failed:
        body["error"] = {"code": "model_failed", "message": info.failed}
    elif stalled is not None:
        body["error"] = {"code": "engine_stalled", "message": stalled}
    return JSONResponse(body, status_code=code)


def trusted(request: Request, state) -> bool:
    """Whether the caller may see operator detail (local paths): keys are off, or it sent a valid one."""
    return not state.keys.enabled or state.keys.valid(presented_key(request))


def _without_path(model: str) -> str:
    """A model named by a local directory shows only the directory's name (no server paths)."""
    return PurePath(model).name if "/" in model and (model.startswith(("/", ".", "~")) or model.count("/") > 1) else model


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: 200 only when the model is loaded, healthy, and the server is not draining."""
    state = request.app.state.csm
    info = state.engine.info
    if state.ready:
        return JSONResponse({"ready": True})
    if state.draining:
        reason = "draining"
    elif info.failed or state.load_error is not None:
        reason = "failed"
    elif info.ready:
        reason = "stalled"
    else:
        reason = "loading"
    return JSONResponse({"ready": False, "reason": reason}, status_code=503, headers={"Retry-After": "5"})
