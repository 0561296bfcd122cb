"""What every HTTP request passes before a route sees it (a plain ASGI middleware, so streaming
responses and their cancellation stay in the route's own task).

In order: the request id (``X-Request-Id``, bounded and stripped of control characters) for the log;
the API key; for requests that change state, the Origin (a browser page from another site may not
use the server, keys or not) and, on JSON routes, a JSON body (a cross-site ``text/plain`` POST is
refused); the body size, by ``Content-Length`` before anything is read and by counting while it
streams in, so an upload is cut as soon as it passes the limit, never spooled whole first.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from csmserve.logs import clean_id, request_id
from csmserve.server.auth import is_public, presented_key
from csmserve.server.state import ServerState
from csmserve.speech.voices import client_connection

JSON_ROUTES = ("/generate", "/v1/audio/speech")
#: ElevenLabs' text-to-speech POSTs (``/v1/text-to-speech/{voice_id}`` and its variants) take JSON too.
JSON_PREFIXES = ("/v1/text-to-speech/",)
UPLOAD_ROUTES = ("/v1/voices",)
#: Room for the multipart framing and form fields around an upload.
UPLOAD_OVERHEAD = 64 * 1024
STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")


class BodyTooLarge(Exception):
    """Raised from ``receive`` once the body passes the limit; the client gets a 413."""


def error_body(status: int, code: str, message: str, headers: dict | None = None) -> tuple[int, bytes, list]:
    """An error every client understands: ``code``/``message`` (csmserve) and ``type`` (OpenAI)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = json.dumps({"error": {"code": code, "message": message, "type": kind, "param": None}}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return status, body, raw


async def send_error(send: Send, status: int, code: str, message: str, headers: dict | None = None) -> None:
    status, body, raw = error_body(status, code, message, headers)
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def cross_site(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a browser request from ``origin`` comes from a site that may not use the server."""
    if origin is None:
        return False  # not a browser page (curl, SDKs, servers)
    if allowed:
        return origin not in allowed
    return urlsplit(origin).netloc.lower() != (host or "").lower()


class Guard:
    """The ASGI middleware over the app's shared ``state``."""

    def __init__(self, app: ASGIApp, state: ServerState):
        self.app = app
        self.state = state

    def body_limit(self, path: str) -> int:
        settings = self.state.settings
        if path.startswith(UPLOAD_ROUTES):
            return settings.max_upload_bytes + UPLOAD_OVERHEAD
        return settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            client = scope.get("client")  # (host, port): one TCP connection, what "once per connection" counts
            client_connection.set(tuple(client) if client else None)
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        headers = conn.headers
        request_id.set(clean_id(headers.get("x-request-id")))
        refusal = self.refusal(scope, conn, headers)
        if refusal is not None:
            await send_error(send, *refusal)
            return
        await self.limited(scope, receive, send, headers)

    def refusal(self, scope: Scope, conn: HTTPConnection, headers: Headers) -> tuple | None:
        """Why the request is refused before it is read (status, code, message, headers), or None."""
        settings, keys = self.state.settings, self.state.keys
        path, method = scope["path"], scope["method"]
        if keys.enabled and not is_public(path, settings.protect_metrics):
            key = presented_key(conn)
            if not key:
                message = "an API key is required: Authorization: Bearer <key>, X-API-Key, or ?token="
                return 401, "unauthorized", message, {"WWW-Authenticate": "Bearer"}
            if not keys.valid(key):
                return 403, "forbidden", "the API key is not valid", None
        if method in STATE_CHANGING:
            if cross_site(headers.get("origin"), headers.get("host"), settings.allowed_origins):
                return 403, "forbidden_origin", "requests from this Origin are not allowed (CSM_ALLOWED_ORIGINS)", None
            content_type = headers.get("content-type")
            if (path in JSON_ROUTES or path.startswith(JSON_PREFIXES)) and content_type is not None and not _is_json(content_type):
                return 415, "unsupported_media_type", "send the body as JSON with Content-Type: application/json", None
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.body_limit(path)):
            return self.too_large(path)
        return None

    def too_large(self, path: str) -> tuple:
        """The 413 for a body past the limit (uploads: ``upload_too_large``, as the voices API always said)."""
        if path.startswith(UPLOAD_ROUTES):
            code, what = "upload_too_large", f"uploads are limited to {self.state.settings.max_upload_bytes} bytes"
        else:
            code, what = "body_too_large", f"request bodies on {path} are limited to {self.body_limit(path)} bytes"
        return 413, code, what, {"Connection": "close"}

    async def limited(self, scope: Scope, receive: Receive, send: Send, headers: Headers) -> None:
        """Run the app with the body counted as it arrives. Past the limit, reading stops and the
        client gets a 413, whatever the app (or a body parser wrapping our exception) answers."""
        limit = self.body_limit(scope["path"])
        received = 0
        started = False
        too_large = self.too_large(scope["path"])

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge
            return message

        async def checked_send(message: Message) -> None:
            nonlocal started
            if received > limit:
                if not started:
                    started = True
                    await send_error(send, *too_large)
                return  # the app's own answer to a body it could not read
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, checked_send)
        except BodyTooLarge:
            if started:
                raise
            await send_error(send, *too_large)


def _is_json(content_type: str) -> bool:
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")
