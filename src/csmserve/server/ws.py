"""The rule every WebSocket route shares, without a protocol: a :class:`Socket` each API composes.

* Before accept (:func:`admit`, :func:`accept`): the Origin and a header/query key; a refused socket is closed 1008.
* After accept: a socket without a key takes a place in the waiting room (:meth:`Socket.wait_for_key`,
  at most ``max_unauthenticated``) until it shows one, by ``auth_timeout_s`` after accept
  (:meth:`Socket.auth_remaining`: frames do not extend it; each API closes a socket whose first
  frame is not its key, oversize ones included); a draining server refuses new work.
* Sending (:meth:`Socket.send`): audio is paced by what the client has taken
  (:mod:`csmserve.server.pacing`: at most ``max_lead_s`` ahead); a client that takes nothing for
  ``max_lag_s`` is cut (:class:`~csmserve.errors.ClientTooSlow`), which cancels its generation.
* Receiving: frames bounded in bytes (:meth:`Socket.payload`), deadlines the protocol chooses.
* Running (:meth:`Socket.serve`): the connection's loops until one ends, then every child task is
  cancelled (generation stops before its next frame) and the socket closes with the code it asked for.

Each API renders refusals in its own message shape; the close codes come from the error types.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import anyio
from fastapi import WebSocket, WebSocketDisconnect

from csmserve.errors import ClientTooSlow, CsmServeError, MessageTooLarge, Overloaded, Unauthorized
from csmserve.server.admission import SHUTTING_DOWN, WAITING_ROOM_FULL
from csmserve.server.auth import key_id, presented_key, tenant_of
from csmserve.server.pacing import Pacer, delivery_of
from csmserve.server.state import ServerState
from csmserve.speech import StreamStats

log = logging.getLogger(__name__)

#: Close codes that no error type carries: a normal end (idle, the client's close) and a refusal before accept.
NORMAL, POLICY_VIOLATION = 1000, Unauthorized.ws_close_code


class CloseConnection(Exception):
    """End the connection with ``code`` after what was already sent."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason

    @classmethod
    def because(cls, error: CsmServeError, reason: str) -> CloseConnection:
        """Close with the code ``error`` carries (1013 overloaded, 1008 unauthorized or too slow)."""
        return cls(error.ws_close_code, reason)


async def wait_for_child(task: asyncio.Task) -> None:
    """Wait until ``task`` ends (a cancel of it alone returns normally); cancelling the waiter cancels it too."""
    try:
        await asyncio.wait({task})
    except asyncio.CancelledError:
        task.cancel()
        raise


async def admit(websocket: WebSocket, state: ServerState) -> bool | None:
    """Check Origin and a header/query key before accepting. None: refused (403 before accept);
    True: authenticated; False: the key must come in a message."""
    allowed = state.settings.allowed_origins
    origin = websocket.headers.get("origin")
    if allowed and origin not in allowed:
        log.warning("refused WebSocket from origin %r", origin)
        await websocket.close(POLICY_VIOLATION)
        return None
    if not state.keys.enabled:
        return True
    key = presented_key(websocket)
    if key is None:
        return False
    if not state.keys.valid(key):
        await websocket.close(POLICY_VIOLATION)
        return None
    return True


async def accept(websocket: WebSocket, state: ServerState) -> Socket | None:
    """Admit (:func:`admit`) and accept ``websocket``: its :class:`Socket`, or None when it was refused."""
    authenticated = await admit(websocket, state)
    if authenticated is None:
        return None
    await websocket.accept()
    socket = Socket(websocket, state, authenticated)
    if authenticated and state.keys.enabled:  # the key came in a header or the URL
        socket.key_id = key_id(presented_key(websocket))
    return socket


class Socket:
    """One accepted WebSocket: lag-limited sends, bounded frames, the waiting room, the loops."""

    def __init__(self, websocket: WebSocket, state: ServerState, authenticated: bool):
        self.ws = websocket
        self.state = state
        self.settings = state.settings
        self.authenticated = authenticated
        #: The id of the key it showed (:func:`~csmserve.server.auth.key_id`), for access lines; None without keys.
        self.key_id: str | None = None
        #: Whom the socket's requests act for (its key's id, or its client address); set with the key.
        self.tenant: str | None = tenant_of(websocket, state.keys) if authenticated else None
        self.send_lock = asyncio.Lock()
        self.pacer = Pacer(delivery_of(websocket.scope), self.settings.max_lead_s, self.settings.max_lag_s)
        #: The first failure a child task reported (:meth:`fail`); it ends the connection.
        self.failure: BaseException | None = None
        self._waiting = False  # holds a place in the waiting room
        #: When a socket without a key must have shown one (from accept; frames do not move it).
        self.auth_deadline = time.monotonic() + self.settings.auth_timeout_s
        self._loops: list[asyncio.Task] = []

    # -- admission ----------------------------------------------------------------------------------
    def refusal(self, message: str = SHUTTING_DOWN) -> Overloaded | None:
        """Why new work is refused now (the server is draining: ``message``), or None."""
        return Overloaded(message) if self.state.admission.draining else None

    def wait_for_key(self) -> Overloaded | None:
        """A socket without a key takes a place in the waiting room; the error when it is full."""
        if self.authenticated or self._waiting:
            return None
        if not self.state.admission.wait_for_key():
            return Overloaded(WAITING_ROOM_FULL)
        self._waiting = True
        return None

    def auth_remaining(self) -> float:
        """Seconds left for a socket without a key to show it (0 once the deadline has passed)."""
        return max(0.0, self.auth_deadline - time.monotonic())

    def accept_key(self, key: str | None) -> bool:
        """Whether ``key`` (from a message) is valid; if so the socket leaves the waiting room."""
        tenant = self.state.keys.key_id(key)
        if tenant is None:
            return False
        self.authenticated, self.tenant = True, tenant
        self.key_id = key_id(key)
        self.release()
        return True

    def release(self) -> None:
        """Give back the socket's place in the waiting room, if it holds one."""
        if self._waiting:
            self._waiting = False
            self.state.admission.key_given()

    # -- sending ------------------------------------------------------------------------------------
    async def send_json(self, event: dict, paced: StreamStats | None = None) -> None:
        await self.send(json.dumps(event), paced)

    async def send(self, item: bytes | str, paced: StreamStats | None = None) -> None:
        """Send one frame; a client that has not read for ``max_lag_s`` is closed (its stream cancelled).
        ``paced``: the frame carries audio of the stream these figures count, and waits until the
        client has taken all but ``max_lead_s`` of that stream (:class:`~csmserve.server.pacing.Pacer`)."""
        try:
            if paced is not None:
                await self.pacer.wait(paced)
            async with self.send_lock:
                with anyio.fail_after(self.settings.max_lag_s):
                    if isinstance(item, bytes):
                        await self.ws.send_bytes(item)
                    else:
                        await self.ws.send_text(item)
                if paced is not None:
                    self.pacer.sent(paced)
        except (TimeoutError, ClientTooSlow):
            self.state.metrics.slow_clients.inc()
            raise CloseConnection.because(ClientTooSlow("client reads too slowly"), "client reads too slowly") from None

    # -- receiving ----------------------------------------------------------------------------------
    async def receive(self, timeout_s: float | None = None) -> dict | None:
        """The next ASGI message (``websocket.receive`` or ``websocket.disconnect``); None when none
        came within ``timeout_s``."""
        if timeout_s is None:
            return await self.ws.receive()
        try:
            with anyio.fail_after(timeout_s):
                return await self.ws.receive()
        except TimeoutError:
            return None

    def payload(self, message: dict) -> str | bytes:
        """The payload of a received frame. Raises :class:`MessageTooLarge` past ``max_message_bytes``
        (counted in bytes, not characters); the connection stays usable."""
        raw = message.get("text")
        if raw is None:
            raw = message.get("bytes") or b""
        limit = self.settings.max_message_bytes
        size = len(raw.encode("utf-8", "surrogatepass")) if isinstance(raw, str) else len(raw)
        if size > limit:
            raise MessageTooLarge(f"messages are limited to {limit} bytes")
        return raw

    # -- running ------------------------------------------------------------------------------------
    def fail(self, exc: BaseException) -> None:
        """A child task failed in a way that ends the connection (a slow client, an overload)."""
        if self.failure is None:
            self.failure = exc
        for task in self._loops:
            task.cancel()

    async def serve(
        self, loops: Iterable[Coroutine[Any, Any, None]], children: Callable[[], Iterable[asyncio.Task | None]] = tuple
    ) -> None:
        """Run the connection's loops until one ends (or :meth:`fail`); then cancel them and the tasks
        ``children()`` names (asked first, so the protocol can count what was still in flight), and
        close with the code a :class:`CloseConnection` asked for."""
        tasks = self._loops = [asyncio.create_task(loop) for loop in loops]
        close = None
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            ended = [self.failure] if self.failure is not None else [t.exception() for t in done if not t.cancelled()]
            for exc in ended:
                if isinstance(exc, CloseConnection):
                    close = exc
                elif exc is not None and not isinstance(exc, WebSocketDisconnect):
                    log.warning("connection ended: %r", exc)
        finally:
            self.release()
            everything = [*tasks, *(t for t in children() if t is not None)]
            for task in everything:
                task.cancel()
            for task in everything:
                with contextlib.suppress(BaseException):
                    await task
            if close is not None:
                with contextlib.suppress(Exception):
                    await self.ws.close(close.code, close.reason)
