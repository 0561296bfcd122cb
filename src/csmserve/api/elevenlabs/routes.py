"""The ElevenLabs API's routes: its text-to-speech WebSockets and HTTP endpoints."""

from __future__ import annotations

from fastapi import APIRouter

from csmserve.api.elevenlabs import rest, websocket

router = APIRouter()
router.include_router(websocket.router)
router.include_router(rest.router)
