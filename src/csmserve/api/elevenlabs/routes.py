"""The ElevenLabs API's routes: its text-to-speech WebSockets and HTTP endpoints, and what its
clients ask about the account (models, user). Its voice paths are the voice library's (:mod:`csmserve.api.voices`)."""

from __future__ import annotations

from fastapi import APIRouter

from csmserve.api.elevenlabs import account, rest, websocket

router = APIRouter()
router.include_router(websocket.router)
router.include_router(rest.router)
router.include_router(account.router)
