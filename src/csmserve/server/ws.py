"""``/ws/generate``: a receive loop and a send loop per connection, over :class:`Session`.

The receive loop never waits on the model: it validates each frame, answers errors at once, queues
requests and cancels. The send loop streams one request at a time. A cancel or a disconnect cancels
the streaming task, which cancels generation in the worker before its next frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from csmserve.errors import CsmServeError, GenerationFailed, NotReady
from csmserve.pipeline import StreamStats, pcm_chunks, synthesis_request
from csmserve.protocol import done_event, error_event
from csmserve.session import Job, Session, failure_event

log = logging.getLogger(__name__)
router = APIRouter()


class Connection:
    def __init__(self, websocket: WebSocket, state):
        self.ws = websocket
        self.state = state
        self.session = Session(state.limits, state.settings.max_pending_per_connection)
        self.wake = asyncio.Event()
        self.streaming: asyncio.Task | None = None
        self.send_lock = asyncio.Lock()

    async def send_json(self, event: dict) -> None:
        async with self.send_lock:
            await self.ws.send_text(json.dumps(event))

    async def receive_loop(self) -> None:
        max_bytes = self.state.settings.max_message_bytes
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            raw = message.get("text")
            if raw is None:
                raw = message.get("bytes") or b""
            if len(raw) > max_bytes:
                await self.send_json(
                    error_event("message_too_large", f"messages are limited to {max_bytes} bytes")
                )
                continue
            outcome = self.session.handle(raw, time.monotonic())
            for event in outcome.events:
                await self.send_json(event)
            if outcome.cancel_current and self.streaming is not None:
                self.streaming.cancel()
            self.wake.set()

    async def send_loop(self) -> None:
        while True:
            job = self.session.next_job()
            if job is None:
                self.wake.clear()
                await self.wake.wait()
                continue
            task = self.streaming = asyncio.create_task(self.stream(job))
            try:
                await asyncio.wait({task})
            except asyncio.CancelledError:
                task.cancel()
                raise
            finally:
                self.streaming = None
                self.session.finish()
            if task.cancelled():
                await self.send_json(done_event(job.request.request_id, cancelled=True))
            elif task.exception() is not None:
                raise task.exception()

    async def stream(self, job: Job) -> None:
        request = job.request
        engine = self.state.engine
        if not engine.info.ready:
            error = NotReady("the model is still loading; retry when /health says healthy")
            await self.send_json(failure_event(error, request.request_id))
            return
        stats = StreamStats(engine.sample_rate, started=job.received_at)
        try:
            async for chunk in pcm_chunks(
                engine, synthesis_request(request, self.state.settings), request.chunk_ms, request.first_chunk_ms, stats
            ):
                async with self.send_lock:
                    await self.ws.send_bytes(chunk)
        except CsmServeError as exc:
            log.warning("request %s failed: %s", request.request_id, exc.message)
            await self.send_json(failure_event(exc, request.request_id))
            return
        except (WebSocketDisconnect, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - one request's failure must not end the connection
            log.exception("request %s failed", request.request_id)
            await self.send_json(failure_event(GenerationFailed(f"generation failed: {exc}"), request.request_id))
            return
        extra = {"ignored_fields": list(request.ignored_fields)} if request.ignored_fields else {}
        await self.send_json(done_event(request.request_id, **stats.as_event_fields(), **extra))


@router.websocket("/ws/generate")
async def ws_generate(websocket: WebSocket) -> None:
    await websocket.accept()
    connection = Connection(websocket, websocket.app.state.csm)
    receiver = asyncio.create_task(connection.receive_loop())
    sender = asyncio.create_task(connection.send_loop())
    try:
        done, _ = await asyncio.wait({receiver, sender}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            exc = task.exception()
            if exc is not None and not isinstance(exc, WebSocketDisconnect):
                log.warning("connection ended: %r", exc)
    finally:
        for task in (receiver, sender, connection.streaming):
            if task is not None:
                task.cancel()
        for task in (receiver, sender):
            with contextlib.suppress(BaseException):
                await task
