"""``/ws/generate``: a receive loop and a send loop per connection, over :class:`Session`.

The receive loop never waits on the model: it validates each frame, answers errors at once, queues
requests, streamed text and cancels. The send loop streams one job at a time. A cancel or a
disconnect cancels the streaming task, which cancels generation in the worker before its next frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from csmserve.engine import Continuation
from csmserve.errors import CsmServeError, GenerationFailed, NotReady
from csmserve.pipeline import AudioOutput, StreamStats, stream_audio, synthesis_request
from csmserve.protocol import done_event
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

    async def send(self, item: bytes | str) -> None:
        async with self.send_lock:
            if isinstance(item, bytes):
                await self.ws.send_bytes(item)
            else:
                await self.ws.send_text(item)

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
                from csmserve.protocol import error_event

                await self.send_json(error_event("message_too_large", f"messages are limited to {max_bytes} bytes"))
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
            task = self.streaming = asyncio.create_task(self.run(job))
            try:
                await asyncio.wait({task})
            except asyncio.CancelledError:
                task.cancel()
                raise
            finally:
                self.streaming = None
                self.session.finish()
            if task.cancelled():
                if job.stream is None:  # a text stream's cancel was already answered by the session
                    await self.send_json(done_event(job.request_id, cancelled=True))
            elif task.exception() is not None:
                raise task.exception()

    async def run(self, job: Job) -> None:
        request = job.request
        engine = self.state.engine
        stream = job.stream
        try:
            if stream is not None and stream.output is None:
                stream.stats = StreamStats(engine.sample_rate, started=stream.started_at)
                stream.output = AudioOutput(request, engine.sample_rate, stream.stats)
                stream.continuation = Continuation()
            if job.final:
                for item in stream.output.finish():
                    await self.send(item)
                await self.send_json(
                    done_event(request.request_id, context_id=stream.context_id, **stream.stats.as_event_fields())
                )
                return
            if not engine.info.ready:
                raise NotReady("the model is still loading; retry when /health says healthy")
            if stream is None:
                stats = StreamStats(engine.sample_rate, started=job.received_at)
                output = AudioOutput(request, engine.sample_rate, stats)
                continuation = None
            else:
                stats, output, continuation = stream.stats, stream.output, stream.continuation
            synth = synthesis_request(request, self.state.settings, self.state.voices, continuation)
            async for item in stream_audio(engine, synth, output, finish=stream is None):
                await self.send(item)
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
        if stream is None:
            extra = {"ignored_fields": list(request.ignored_fields)} if request.ignored_fields else {}
            await self.send_json(
                done_event(
                    request.request_id,
                    **stats.as_event_fields(),
                    sample_rate=request.sample_rate,
                    format=request.format,
                    **extra,
                )
            )


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
