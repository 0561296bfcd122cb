"""``/ws/generate``: a receive loop and a send loop per connection, over :class:`Session`.

The receive loop never waits on the model: it validates each frame, answers errors at once, queues
requests, streamed text and cancels. The send loop streams one job at a time. A cancel or a
disconnect cancels the streaming task, which cancels generation in the worker before its next frame.

Admission (auth, Origin, capacity, drain) happens here too: refused requests get an error frame and
the close code that says why (1008 policy, 1013 try again later).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

import anyio
from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from csmserve.engine import Continuation
from csmserve.errors import CsmServeError, GenerationFailed, NotReady, Overloaded
from csmserve.logs import request_id as current_request_id
from csmserve.pipeline import AudioOutput, StreamStats, deadline, stream_audio, synthesis_request
from csmserve.protocol import done_event, error_event
from csmserve.server.auth import presented_key
from csmserve.server.streaming import outcome_of
from csmserve.session import Job, Session, failure_event

log = logging.getLogger(__name__)
router = APIRouter()

POLICY_VIOLATION, TRY_AGAIN_LATER, NORMAL = 1008, 1013, 1000


async def wait_for_child(task: asyncio.Task) -> None:
    """Wait until ``task`` ends (a cancel of it alone returns normally); cancelling the waiter cancels it too."""
    try:
        await asyncio.wait({task})
    except asyncio.CancelledError:
        task.cancel()
        raise


class CloseConnection(Exception):
    """End the connection with ``code`` after what was already sent."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


class Connection:
    def __init__(self, websocket: WebSocket, state, authenticated: bool):
        self.ws = websocket
        self.state = state
        self.settings = state.settings
        settings = state.settings
        self.session = Session(
            state.limits, settings.max_pending_per_connection, settings.max_stream_chars, settings.max_contexts_per_connection
        )
        self.wake = asyncio.Event()
        self.streaming: asyncio.Task | None = None
        self.send_lock = asyncio.Lock()
        self.authenticated = authenticated
        self.counted = None

    async def send_json(self, event: dict) -> None:
        await self.send(json.dumps(event))

    async def send(self, item: bytes | str) -> None:
        """Send one frame; a client that has not read for ``max_lag_s`` is closed (its stream cancelled)."""
        async with self.send_lock:
            try:
                with anyio.fail_after(self.settings.max_lag_s):
                    if isinstance(item, bytes):
                        await self.ws.send_bytes(item)
                    else:
                        await self.ws.send_text(item)
            except TimeoutError:
                self.state.metrics.slow_clients.inc()
                raise CloseConnection(POLICY_VIOLATION, "client reads too slowly") from None

    # -- receiving ------------------------------------------------------------------------------
    async def receive(self) -> dict:
        busy = self.session.current is not None or self.session.pending
        if busy:
            return await self.ws.receive()
        if not self.authenticated:  # a stranger gets a short deadline, not the idle timeout
            timeout, close = self.settings.auth_timeout_s, CloseConnection(POLICY_VIOLATION, "no API key in time")
        else:
            timeout, close = self.settings.idle_timeout_s, CloseConnection(NORMAL, "idle timeout")
        try:
            with anyio.fail_after(timeout):
                return await self.ws.receive()
        except TimeoutError:
            raise close from None

    def key_presented(self) -> None:
        """The connection showed a valid key after accept: it leaves the ones waiting for it."""
        if not self.authenticated:
            self.authenticated = True
            self.state.unauthenticated -= 1

    def release(self) -> None:
        """The connection ended: if it was still waiting for its key, its place is free."""
        if not self.authenticated:
            self.authenticated = True
            self.state.unauthenticated -= 1

    def count_disconnect(self) -> None:
        """Count the current request as ``disconnected`` (once), when its client went away or was cut."""
        job = self.session.current
        if job is not None and job is not self.counted:
            self.counted = job
            self.state.metrics.disconnects.inc()
            self.state.metrics.finished("ws", "disconnected")

    async def authenticate(self, raw) -> bool:
        """The first message of a connection without a header/query key must carry ``token``.

        Returns whether the message was only that (``{"token": ...}``, optionally ``"type": "auth"``),
        so that it is not also handled as a request."""
        data = None
        with contextlib.suppress(ValueError, TypeError, RecursionError):
            data = json.loads(raw)
        token = data.get("token") if isinstance(data, dict) else None
        if self.state.keys.valid(token if isinstance(token, str) else None):
            self.key_presented()
            return set(data) <= {"token", "type"} and data.get("type") in (None, "auth")
        await self.send_json(
            error_event("unauthorized", "an API key is required: Authorization: Bearer, X-API-Key, ?token= or a token field")
        )
        raise CloseConnection(POLICY_VIOLATION, "unauthorized")

    async def next_frame(self, message: dict, too_large=None) -> str | bytes | None:
        """The payload of a received ``message``; None for a disconnect. A payload over
        ``max_message_bytes`` is answered (``too_large(limit)`` builds the event) and also None."""
        if message["type"] == "websocket.disconnect":
            return None
        raw = message.get("text")
        if raw is None:
            raw = message.get("bytes") or b""
        limit = self.settings.max_message_bytes
        size = len(raw.encode("utf-8", "surrogatepass")) if isinstance(raw, str) else len(raw)  # bytes, not characters
        if size > limit:
            event = too_large(limit) if too_large else error_event("message_too_large", f"messages are limited to {limit} bytes")
            await self.send_json(event)
            return None
        return raw

    async def receive_loop(self) -> None:
        while True:
            message = await self.receive()
            raw = await self.next_frame(message)
            if message["type"] == "websocket.disconnect":
                self.count_disconnect()
                return
            if raw is None:
                continue
            if not self.authenticated and await self.authenticate(raw):
                continue  # an auth-only message
            if self.state.draining:
                await self.send_json(error_event("overloaded", "the server is shutting down; reconnect to another instance"))
                raise CloseConnection(TRY_AGAIN_LATER, "draining")
            outcome = self.session.handle(raw, time.monotonic())
            for event in outcome.events:
                if event.get("cancelled"):
                    self.state.metrics.cancellations.inc()
                await self.send_json(event)
            if outcome.cancel_current and self.streaming is not None:
                if self.session.current is not None and self.session.current.stream is None:
                    self.state.metrics.cancellations.inc()
                self.streaming.cancel()
            self.wake.set()

    # -- sending --------------------------------------------------------------------------------
    async def send_loop(self) -> None:
        while True:
            job = self.session.next_job()
            if job is None:
                self.wake.clear()
                await self.wake.wait()
                continue
            task = self.streaming = asyncio.create_task(self.run(job))
            try:
                await wait_for_child(task)
            finally:
                self.streaming = None
                self.session.finish()
            if task.cancelled():
                if job.stream is None:  # a text stream's cancel was already answered by the session
                    self.state.metrics.finished("ws", "cancelled")
                    await self.send_json(done_event(job.request_id, cancelled=True))
            elif task.exception() is not None:
                raise task.exception()

    async def run(self, job: Job) -> None:
        request = job.request
        current_request_id.set(request.request_id)
        if job.final:
            stream = job.stream
            if stream.output is None:  # nothing was spoken on this stream
                await self.send_json(done_event(request.request_id, context_id=stream.context_id, audio_ms=0))
                return
            for item in stream.output.finish():
                await self.send(item)
            self.state.metrics.finished("ws", "ok", stream.stats)
            await self.send_json(
                done_event(request.request_id, context_id=stream.context_id, **stream.stats.as_event_fields())
            )
            return
        try:
            self.state.enter("ws")
        except Overloaded as exc:
            await self.send_json(failure_event(exc, request.request_id))
            raise CloseConnection(TRY_AGAIN_LATER, "overloaded") from None
        try:
            final = await self.stream(job)
        finally:
            self.state.leave()
        if final is not None:  # sent with the slot already free: a slow reader holds only its connection
            await self.send_json(final)

    async def stream(self, job: Job) -> dict | None:
        """Stream one job's audio; the frame that ends it (``done`` or an error), for the caller to send."""
        request, engine, stream = job.request, self.state.engine, job.stream
        stats = None
        try:
            if not engine.info.ready:
                raise NotReady()
            if stream is None:
                stats = StreamStats(engine.sample_rate, started=job.received_at)
                output = AudioOutput(request, stats)
                continuation = None
            else:
                if stream.output is None:
                    stream.stats = StreamStats(engine.sample_rate, started=stream.started_at)
                    stream.output = AudioOutput(request, stream.stats)
                    stream.continuation = Continuation()
                output, continuation = stream.output, stream.continuation
            synth = synthesis_request(request, self.settings, self.state.voices, continuation)
            with deadline(self.settings.request_timeout_s):
                async with contextlib.aclosing(stream_audio(engine, synth, output, finish=stream is None)) as items:
                    async for item in items:  # closed on any exit: the engine stops generating
                        await self.send(item)
        except Overloaded as exc:
            self.state.metrics.finished("ws", "rejected")
            await self.send_json(failure_event(exc, request.request_id))
            raise CloseConnection(TRY_AGAIN_LATER, "overloaded") from None
        except CsmServeError as exc:
            log.warning("request failed: %s", exc.message)
            self.state.metrics.finished("ws", outcome_of(exc), stats)
            return failure_event(exc, request.request_id)
        except (WebSocketDisconnect, CloseConnection):
            self.count_disconnect()
            raise
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - one request's failure must not end the connection
            log.exception("request failed")
            self.state.metrics.finished("ws", "error", stats)
            return failure_event(GenerationFailed("generation failed"), request.request_id)
        if stream is not None:
            return None  # a text stream's done comes with its end
        self.state.metrics.finished("ws", "ok", stats)
        extra = {"ignored_fields": list(request.ignored_fields)} if request.ignored_fields else {}
        return done_event(
            request.request_id, **stats.as_event_fields(), sample_rate=request.sample_rate, format=request.format, **extra
        )


async def admit(websocket: WebSocket, state) -> bool | None:
    """Check Origin and a header/query key before accepting. None: refused (403 before accept);
    True: authenticated; False: the first message must carry the token."""
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


@router.websocket("/ws/generate")
async def ws_generate(websocket: WebSocket) -> None:
    state = websocket.app.state.csm
    authenticated = await admit(websocket, state)
    if authenticated is None:
        return
    await websocket.accept()
    if state.draining:
        await websocket.send_text(json.dumps(error_event("overloaded", "the server is shutting down")))
        await websocket.close(TRY_AGAIN_LATER, "draining")
        return
    if not authenticated and not wait_for_key(state):
        await websocket.send_text(json.dumps(error_event("overloaded", WAITING_ROOM_FULL)))
        await websocket.close(TRY_AGAIN_LATER, "too many unauthenticated connections")
        return
    connection = Connection(websocket, state, authenticated)
    try:
        await serve(connection)
    finally:
        connection.release()


WAITING_ROOM_FULL = "too many connections are waiting to authenticate"


def wait_for_key(state) -> bool:
    """Count an accepted connection without a key among those waiting for it; False (refuse it with
    1013) when ``max_unauthenticated`` already wait. The :class:`Connection` gives the place back."""
    if state.unauthenticated >= state.settings.max_unauthenticated:
        return False
    state.unauthenticated += 1
    return True


async def serve(connection: Connection) -> None:
    """Run a connection's two loops until one ends; close with the code it asked for."""
    websocket = connection.ws
    receiver = asyncio.create_task(connection.receive_loop())
    sender = asyncio.create_task(connection.send_loop())
    close = None
    try:
        done, _ = await asyncio.wait({receiver, sender}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            exc = task.exception()
            if isinstance(exc, CloseConnection):
                close = exc
            elif exc is not None and not isinstance(exc, WebSocketDisconnect):
                log.warning("connection ended: %r", exc)
    finally:
        for task in (receiver, sender, connection.streaming):
            if task is not None:
                task.cancel()
        for task in (receiver, sender):
            with contextlib.suppress(BaseException):
                await task
        if close is not None:
            with contextlib.suppress(Exception):
                await websocket.close(close.code, close.reason)
