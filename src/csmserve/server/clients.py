"""Which API a client speaks, where two APIs share a path.

OpenAI and ElevenLabs both serve ``GET /v1/models``, in different shapes, and the voice library's paths
(``/v1/voices``) are ElevenLabs' too. A client says which API it speaks by where it puts its key:
ElevenLabs' clients (its SDK, pipecat, LiveKit) send ``xi-api-key``; OpenAI's send
``Authorization: Bearer``. A request with neither (curl) gets OpenAI's and csmserve's shapes.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi.routing import APIRoute
from starlette.requests import HTTPConnection
from starlette.routing import Match
from starlette.types import Scope

#: The header ElevenLabs' API takes its key in.
ELEVENLABS_KEY_HEADER = "xi-api-key"


def speaks_elevenlabs(conn: HTTPConnection) -> bool:
    """Whether the client is an ElevenLabs client: it sent an ``xi-api-key`` header (keys on or off)."""
    return ELEVENLABS_KEY_HEADER in conn.headers


def route_class(serves: Callable[[HTTPConnection], bool]) -> type[APIRoute]:
    """A route class that matches only the requests ``serves`` accepts, so that two APIs may declare
    the same path, each for its own clients (pass to ``add_api_route(route_class_override=...)``)."""

    class ClientRoute(APIRoute):
        def matches(self, scope: Scope) -> tuple[Match, Scope]:
            match, child = super().matches(scope)
            if match is not Match.NONE and scope["type"] == "http" and not serves(HTTPConnection(scope)):
                return Match.NONE, {}
            return match, child

    return ClientRoute


#: Routes for ElevenLabs' clients only, and for every other client.
ElevenLabsRoute = route_class(speaks_elevenlabs)
OtherClientsRoute = route_class(lambda conn: not speaks_elevenlabs(conn))
