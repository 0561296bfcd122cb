"""The seed API's routes: ``/ws/generate``, ``POST /generate`` and ``GET /audio/<id>.wav``."""

from __future__ import annotations

from fastapi import APIRouter

from csmserve.api.seed import rest, websocket

router = APIRouter()
router.include_router(rest.router)
router.include_router(websocket.router)
