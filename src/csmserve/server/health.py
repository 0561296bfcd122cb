"""``/health``: the seed's fields first, then what an operator wants to know about the model."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter()

OFFLINE_VOICE = "offline model: random weights, the audio is noise"


def capacity_fields(capacity) -> dict:
    """What the engine is doing, for an operator and a load balancer: rows, free slots, queue, last step."""
    return {
        "max_batch": capacity.max_batch,
        "active_rows": capacity.active,
        "free_slots": capacity.free_slots,
        "queue_depth": capacity.waiting,
        "last_step_ms": round(capacity.last_step_ms, 2),
        "last_batch": capacity.last_batch,
    }


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    state = request.app.state.csm
    info = state.engine.info
    if info.ready and not info.failed:
        status, code = "healthy", 200
    elif state.load_error is not None or info.failed:
        status, code = "failed", 503
    else:
        status, code = "loading", 503
    body = {
        "status": status,
        "device": info.device,
        "cuda": info.device.startswith("cuda"),
        "model_loaded": info.ready,
        "endpoints": {"websocket": "/ws/generate", "rest": "/generate"},
        "model": info.model,
        "dtype": info.dtype,
        "engine": info.name,
        "offline_model": info.offline_model,
        "voice": OFFLINE_VOICE if info.offline_model else "real",
        "sample_rate": state.engine.sample_rate,
        **info.extra,
        "capacity": capacity_fields(state.engine.capacity()),
    }
    if state.load_error is not None:
        body["error"] = state.load_error.to_dict()
    elif info.failed:
        body["error"] = {"code": "model_failed", "message": info.failed}
    return JSONResponse(body, status_code=code)


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
    else:
        reason = "loading"
    return JSONResponse({"ready": False, "reason": reason}, status_code=503, headers={"Retry-After": "5"})
