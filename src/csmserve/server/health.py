"""``/health``: the seed's fields first, then what an operator wants to know about the model.

Live load (``capacity``: rows, queue, step times) is operator information: with keys configured,
only a caller with a key sees it (and ``/metrics``, which needs one too); the status and the seed's
fields stay open for probes.
"""

from __future__ import annotations

import re

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from csmserve.errors import NotReady
from csmserve.server.auth import presented_key
from csmserve.server.state import ServerState, state_of

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
        "last_step_cpu_ms": round(capacity.last_step_cpu_ms, 2),
        "last_step_device_ms": None if capacity.last_step_device_ms is None else round(capacity.last_step_device_ms, 2),
        "last_batch": capacity.last_batch,
        "realtime_streams": capacity.realtime_streams,
    }


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    state = state_of(request)
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
        "model": info.model,
        "dtype": info.dtype,
        "engine": info.name,
        "offline_model": info.offline_model,
        "voice": OFFLINE_VOICE if info.offline_model else "real",
        "sample_rate": state.engine.sample_rate,
        **info.extra,
    }
    operator = trusted(request, state)
    if operator:
        body["capacity"] = capacity_fields(state.engine.capacity())
    if state.load_error is not None:
        body["error"] = state.load_error.to_dict()
    elif info.failed:
        body["error"] = {"code": "model_failed", "message": info.failed}
    elif stalled is not None:
        body["error"] = {"code": "engine_stalled", "message": stalled}
    if not operator:
        body["model"] = _without_paths(body["model"])
        if "error" in body:
            body["error"] = {**body["error"], "message": _without_paths(body["error"]["message"])}
    return JSONResponse(body, status_code=code)


def trusted(request: Request, state: ServerState) -> bool:
    """Whether the caller may see operator detail (local paths, live load): keys are off, or it sent a valid one."""
    return not state.keys.enabled or state.keys.valid(presented_key(request))


# An absolute or home-relative path (two or more components): what a caller without a key must not see.
_PATH = re.compile(r"(?<![\w:/])~?/(?:[^\s/'\"]+/)+([^\s/'\"]*)")


def _without_paths(text: str) -> str:
    """``text`` with every local path reduced to its last component (a model directory's name)."""
    return _PATH.sub(lambda m: m.group(1) or "[path]", text)


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: 200 only when the model is loaded, healthy, and the server is not draining."""
    state = state_of(request)
    info = state.engine.info
    if state.ready:
        return JSONResponse({"ready": True})
    if state.admission.draining:
        reason = "draining"
    elif info.failed or state.load_error is not None:
        reason = "failed"
    elif info.ready:
        reason = "stalled"
    else:
        reason = "loading"
    return JSONResponse({"ready": False, "reason": reason}, status_code=503, headers=NotReady().headers())
