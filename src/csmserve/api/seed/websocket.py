"""``/ws/generate``: a receive loop and a send loop per connection, over :class:`Session`.

The receive loop never waits on the model: it validates each frame, answers errors at once, queues
requests, streamed text and cancels. The send loop streams one job at a time. A cancel or a
disconnect cancels the streaming task, which cancels generation in the worker before its next frame.

Admission (auth, Origin, capacity, drain) is the shared socket's (:mod:`csmserve.server.ws`):
refused requests get an error frame and the close code their error carries (1008 policy, 1013 try
again later).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import NoReturn

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from csmserve.api.seed.messages import Limits, done_event
from csmserve.api.seed.session import Job, Session, TextStream, failure_event
from csmserve.errors import CsmServeError, GenerationFailed, MessageTooLarge, Overloaded, Unauthorized
from csmserve.logs import request_id as current_request_id
from csmserve.server.access import AccessLine
from csmserve.server.deadline import deadline
from csmserve.server.state import ServerState, state_of
from csmserve.server.streaming import outcome_of
from csmserve.server.ws import NORMAL, CloseConnection, Socket, accept, wait_for_child
from csmserve.speech import AudioSink, Outgoing

log = logging.getLogger(__name__)
router = APIRouter()
ENDPOINT = "ws"
ROUTE = "/ws/generate"
#: What a socket opened while the server drains is told.
ACCEPT_DRAINING = "the server is shutting down"


class Connection:
    """One ``/ws/generate`` connection: its :class:`Session`, its loops, the job streaming now."""

    def __init__(self, socket: Socket):
        self.socket = socket
        self.state: ServerState = socket.state
        settings = self.settings = socket.settings
        self.session = Session(
            Limits.from_settings(settings), settings.max_pending_per_connection, settings.max_stream_chars,
            settings.max_contexts_per_connection,
        )
        self.wake = asyncio.Event()
        self.streaming: asyncio.Task | None = None
        self.counted: Job | None = None
        client = socket.ws.client
        self.client = f"{client.host}:{client.port}" if client else None

    # -- access lines ---------------------------------------------------------------------------
    def access(self, owner: Job | TextStream) -> AccessLine:
        """The access line of a request (a :class:`Job` without a stream) or of a text stream."""
        if owner.access is None:
            request = owner.options if isinstance(owner, TextStream) else owner.request
            voice = request.voice or str(request.speaker_id)
            owner.access = AccessLine(ROUTE, self.client, self.socket.key_id, voice, request_id=request.request_id)
        line = owner.access
        line.chars = owner.chars if isinstance(owner, TextStream) else len(owner.request.text)
        if isinstance(owner, TextStream) and owner.audio is not None:
            line.stats = owner.audio.stats
        return line

    def end_access(self, job: Job, outcome: str) -> None:
        """Write the access line of the request ``job`` is part of (once; a text stream's at its end)."""
        self.access(job.stream if job.stream is not None else job).end(outcome)

    def abandon(self) -> list[asyncio.Task | None]:
        """The connection ended: every request not yet answered ends ``disconnected`` in the access log;
        the task to cancel with the loops."""
        jobs = [self.session.current, *self.session.pending]
        for job in jobs:
            if job is not None:
                self.end_access(job, "disconnected")
        for stream in list(self.session.streams.values()):
            self.access(stream).end("disconnected")
        return [self.streaming]

    async def send_json(self, event: dict) -> None:
        await self.socket.send_json(event)

    async def refuse(self, error: CsmServeError, reason: str, request_id: str | None = None) -> NoReturn:
        """Say why (an error frame), then end the connection with the code the error carries."""
        await self.send_json(failure_event(error, request_id))
        raise CloseConnection.because(error, reason)

    # -- receiving ------------------------------------------------------------------------------
    async def receive(self) -> dict:
        """The next message; while nothing is queued or streaming, a stranger has until
        ``auth_timeout_s`` after accept to send its key, and a client ``idle_timeout_s``."""
        if self.session.current is not None or self.session.pending:
            return await self.socket.receive()
        if not self.socket.authenticated:
            message = await self.socket.receive(self.socket.auth_remaining())
            if message is None:
                raise CloseConnection.because(Unauthorized("no API key in time"), "no API key in time")
            return message
        message = await self.socket.receive(self.settings.idle_timeout_s)
        if message is None:
            raise CloseConnection(NORMAL, "idle timeout")
        return message

    def count_disconnect(self) -> None:
        """Count the current request as ``disconnected`` (once), when its client went away or was cut."""
        job = self.session.current
        if job is not None and job is not self.counted:
            self.counted = job
            self.state.metrics.disconnects.inc()
            self.state.metrics.finished(ENDPOINT, "disconnected")

    async def authenticate(self, raw: str | bytes) -> bool:
        """The first message of a connection without a header/query key must carry ``token``.

        Returns whether the message was only that (``{"token": ...}``, optionally ``"type": "auth"``),
        so that it is not also handled as a request."""
        data = None
        with contextlib.suppress(ValueError, TypeError, RecursionError):
            data = json.loads(raw)
        token = data.get("token") if isinstance(data, dict) else None
        if self.socket.accept_key(token if isinstance(token, str) else None):
            return set(data) <= {"token", "type"} and data.get("type") in (None, "auth")
        await self.refuse(
            Unauthorized("an API key is required: Authorization: Bearer, X-API-Key, ?token= or a token field"),
            "unauthorized",
        )

    async def receive_loop(self) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "websocket.disconnect":
                self.count_disconnect()
                return
            try:
                raw = self.socket.payload(message)
            except MessageTooLarge as exc:
                if not self.socket.authenticated:  # a stranger's first frame must be its key
                    await self.refuse(Unauthorized(f"the first message must carry the API key; {exc.message}"), "unauthorized")
                await self.send_json(failure_event(exc, None))
                continue
            if not self.socket.authenticated and await self.authenticate(raw):
                continue  # an auth-only message
            refusal = self.socket.refusal()
            if refusal is not None:
                await self.refuse(refusal, "draining")
            outcome = self.session.handle(raw, time.monotonic())
            for dropped in outcome.dropped:
                self.access(dropped).end("cancelled")
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
                self.end_access(job, "cancelled")
                if job.stream is None:  # a text stream's cancel was already answered by the session
                    self.state.metrics.finished(ENDPOINT, "cancelled")
                    await self.send_json(done_event(job.request_id, cancelled=True))
            elif task.exception() is not None:
                raise task.exception()

    async def run(self, job: Job) -> None:
        request = job.request
        current_request_id.set(request.request_id)
        if job.final:
            await self.end_stream(job)
            return
        tenant = self.socket.tenant
        try:
            self.state.admission.enter(ENDPOINT, tenant)
        except Overloaded as exc:
            self.end_access(job, "rejected")
            await self.refuse(exc, "overloaded", request.request_id)
        try:
            final = await self.stream(job)
        finally:
            self.state.admission.leave(tenant)
        if final is not None:  # sent with the slot already free: a slow reader holds only its connection
            await self.send_json(final)

    async def end_stream(self, job: Job) -> None:
        """The end of a text stream: what its sink still holds, then its one ``done``."""
        request, stream = job.request, job.stream
        if stream.audio is None:  # nothing was spoken on this stream
            self.end_access(job, "ok")
            await self.send_json(done_event(request.request_id, context_id=stream.context_id, audio_ms=0))
            return
        for item in stream.audio.finish():
            await self.socket.send(item, stream.audio.stats)
        self.state.metrics.finished(ENDPOINT, "ok", stream.audio.stats)
        self.end_access(job, "ok")
        await self.send_json(
            done_event(request.request_id, context_id=stream.context_id, **request.done_figures(stream.audio.stats))
        )

    def prepare(self, job: Job) -> tuple[AudioSink, AsyncIterator[Outgoing]]:
        """The sink and outgoing items of one job: a request's whole audio, or one sentence of a text
        stream (whose sink and continuation live as long as the stream)."""
        speech, request, stream = self.state.speech, job.request, job.stream
        if stream is None:
            sink = request.output_sink(speech.stats(job.received_at))
            return sink, speech.stream(request.to_speech_request(self.socket.tenant), sink)
        if stream.audio is None:
            stream.audio = speech.sentences(request.output_sink(speech.stats(stream.started_at)))
        return stream.audio.sink, stream.audio.speak(request.to_speech_request(self.socket.tenant))

    async def stream(self, job: Job) -> dict | None:
        """Stream one job's audio; the frame that ends it (``done`` or an error), for the caller to send."""
        request = job.request
        stats = None  # a request's figures; a text stream's are counted once, at its end
        try:
            sink, items = self.prepare(job)
            if job.stream is None:
                stats = sink.stats
                self.access(job).stats = stats
            with deadline(self.settings.request_timeout_s):
                async with contextlib.aclosing(items) as frames:
                    async for item in frames:  # closed on any exit: the engine stops generating
                        await self.socket.send(item, sink.stats)  # paced by what the client took
        except Overloaded as exc:
            self.state.metrics.finished(ENDPOINT, "rejected")
            self.end_access(job, "rejected")
            await self.refuse(exc, "overloaded", request.request_id)
        except CsmServeError as exc:
            log.warning("request failed: %s", exc.message)
            self.state.metrics.finished(ENDPOINT, outcome_of(exc), stats)
            if job.stream is None:  # a text stream goes on after a failed sentence
                self.end_access(job, outcome_of(exc))
            return failure_event(exc, request.request_id)
        except (WebSocketDisconnect, CloseConnection):
            self.count_disconnect()
            self.end_access(job, "disconnected")
            raise
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - one request's failure must not end the connection
            log.exception("request failed")
            self.state.metrics.finished(ENDPOINT, "error", stats)
            if job.stream is None:
                self.end_access(job, "error")
            return failure_event(GenerationFailed("generation failed"), request.request_id)
        if job.stream is not None:
            return None  # a text stream's done comes with its end
        self.state.metrics.finished(ENDPOINT, "ok", stats)
        self.end_access(job, "ok")
        extra = {"ignored_fields": list(request.ignored_fields)} if request.ignored_fields else {}
        return done_event(request.request_id, **request.done_figures(stats), **extra)


@router.websocket("/ws/generate")
async def ws_generate(websocket: WebSocket) -> None:
    socket = await accept(websocket, state_of(websocket))
    if socket is None:
        return
    refusals = ((socket.refusal(ACCEPT_DRAINING), "draining"), (socket.wait_for_key(), "too many unauthenticated connections"))
    for refusal, reason in refusals:
        if refusal is not None:
            await websocket.send_text(json.dumps(failure_event(refusal, None)))
            await websocket.close(refusal.ws_close_code, reason)
            return
    connection = Connection(socket)
    await socket.serve([connection.receive_loop(), connection.send_loop()], children=connection.abandon)
