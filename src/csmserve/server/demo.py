"""The demo page at ``/``: a static page that streams ``/ws/generate`` into Web Audio.

The page and its assets ship inside the package (``csmserve/static/``, package data), so an installed
csmserve serves them without a build step. Only the names in :data:`ASSETS` are served: nothing a
client sends becomes a file-system path. The page itself holds no secret; an API key typed into it
travels as ``?token=`` on the WebSocket URL and as ``Authorization: Bearer`` on fetches.
"""

from __future__ import annotations

import functools
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from csmserve.errors import NotFound

router = APIRouter()

#: Every asset the page loads, with its media type.
ASSETS = {
    "demo.js": "text/javascript; charset=utf-8",
    "pcm-player.js": "text/javascript; charset=utf-8",
    "demo.css": "text/css; charset=utf-8",
}


@functools.cache
def _read(name: str) -> bytes:
    """The bytes of ``csmserve/static/<name>`` (read once: the files are part of the install)."""
    return resources.files("csmserve").joinpath("static", name).read_bytes()


@router.get("/", include_in_schema=False)
async def index() -> Response:
    return Response(
        _read("index.html"), media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"}
    )


@router.get("/static/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise NotFound(f"no demo asset named {name[:64]!r}")
    return Response(_read(name), media_type=media_type, headers={"Cache-Control": "no-cache"})
