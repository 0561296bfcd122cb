"""The engine as the API sees it when the model runs in its own process: the same contract, over ZeroMQ.

:class:`EngineClient` implements :class:`~csmserve.engine.Engine` in an API worker: ``synthesize`` sends
the request and yields the frames the engine sends back; the credit for each frame the consumer takes
goes back to the engine, batched per event-loop tick, so a client that stops reading makes its stream sit
out the engine's steps exactly as in one process. The engine's state (ready, failed, load) arrives with
its beats; when they stop for ``engine_heartbeat_timeout_s`` (the process died or hangs) every stream in
flight ends with :class:`~csmserve.errors.ModelFailed` and the engine reports not ready, with the
reason, until a new incarnation says it is ready.

:class:`ProcessEngine` is a client that also starts and supervises the engine process
(:class:`~csmserve.engine.supervisor.EngineSupervisor`); :class:`EngineGroup` spreads requests over one
engine per GPU by free capacity.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator

import numpy as np

from csmserve.config import Settings
from csmserve.engine import Capacity, Continuation, EngineInfo, SynthesisRequest, wire
from csmserve.errors import ModelFailed, ModelLoadError, NotReady

log = logging.getLogger(__name__)


class EngineClient:
    """One engine process at ``address`` (``ipc://...``), seen as an :class:`~csmserve.engine.Engine`."""

    sample_rate = 24_000

    def __init__(self, settings: Settings, address: str):
        self.settings = settings
        self.address = address
        self.info = EngineInfo(name=settings.engine, model=settings.model or settings.engine)
        self.info.extra["engine_process"] = True
        self._capacity = Capacity(max_batch=settings.max_batch or 1)
        #: Prompt positions the engine prefilled (``computed``) and took from its cache (``reused``).
        self.prefill_positions: dict[str, int] = {}
        self._codec = wire.Codec()
        self._numbers = itertools.count(1)
        self._streams: dict[int, asyncio.Queue] = {}
        self._calls: dict[int, asyncio.Future] = {}
        self._credits: dict[int, int] = {}
        self._incarnation: int | None = None
        self._dead: int | None = None  # the incarnation whose process is known to have exited
        self._last_beat = 0.0
        self._lost: str | None = None
        self._tasks: list[asyncio.Task] = []
        self._socket = None
        self._changed: asyncio.Event | None = None

    # -- the contract ----------------------------------------------------------------------------------
    def capacity(self) -> Capacity:
        return self._capacity

    async def start(self) -> None:
        """Connect, and return once the engine says it is ready; raises :class:`ModelLoadError` when it
        says its model cannot be loaded (or :meth:`gave_up` says why it never will)."""
        import zmq
        import zmq.asyncio

        self._changed = asyncio.Event()
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.IDENTITY, f"api-{os.getpid()}-{uuid.uuid4().hex[:8]}".encode())
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(self.address)
        self._send(wire.Hello(worker=str(os.getpid())))
        self._last_beat = time.monotonic()
        self._tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self._keep_alive())]
        while not self.info.ready:
            reason = self.info.failed if self._incarnation is not None else None
            reason = reason or self.gave_up()
            if reason:
                raise ModelLoadError(reason)
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 0.5)

    def gave_up(self) -> str | None:
        """Why the engine will never be ready (a supervisor's answer); ``None``: keep waiting."""
        return None

    async def close(self) -> None:
        if self._socket is None:
            return
        self._send(wire.Bye())
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._fail_streams(NotReady("the server is shutting down"))
        self._socket.close(linger=100)
        self._context.term()
        self._socket = None

    async def encode(self, audio: np.ndarray) -> np.ndarray:
        if not self.info.ready:
            raise NotReady()
        number = next(self._numbers)
        future = asyncio.get_running_loop().create_future()
        self._calls[number] = future
        self._send(wire.Encode(number, np.asarray(audio, dtype=np.float32)))
        try:
            return await future
        finally:
            self._calls.pop(number, None)

    def release(self, continuation: Continuation) -> None:
        if self._socket is not None:
            self._send(wire.Release(continuation.id))

    async def synthesize(self, request: SynthesisRequest) -> AsyncIterator[np.ndarray]:
        if not self.info.ready:
            raise ModelFailed(self.info.failed) if self.info.failed else NotReady()
        number = next(self._numbers)
        items: asyncio.Queue = asyncio.Queue()  # bounded by the engine's credit: it sends no more
        self._streams[number] = items
        self._send(wire.Submit(number, request))
        try:
            while True:
                kind, payload = await items.get()
                if kind == wire.END:
                    return
                if kind == wire.ERROR:
                    raise payload
                self._grant(number)
                yield payload
        finally:
            if self._streams.pop(number, None) is not None and self._socket is not None:
                self._send(wire.Cancel(number))  # left early: the engine frees the row

    # -- messages ------------------------------------------------------------------------------------------
    def _send(self, message) -> None:
        future = self._socket.send(self._codec.encode(message))
        future.add_done_callback(_quiet)

    def _grant(self, number: int) -> None:
        if not self._credits:
            asyncio.get_running_loop().call_soon(self._send_credits)
        self._credits[number] = self._credits.get(number, 0) + 1

    def _send_credits(self) -> None:
        grants, self._credits = list(self._credits.items()), {}
        if grants and self._socket is not None:
            self._send(wire.Credit(grants))

    async def _receive(self) -> None:
        while True:
            data = await self._socket.recv()
            try:
                message = self._codec.outbound(data)
            except Exception:  # noqa: BLE001 - a bad message is dropped
                log.exception("dropped a message from the engine that could not be read")
                continue
            if isinstance(message, wire.Step):
                self._capacity = message.capacity
                for item in message.items:
                    self._item(item)
            elif isinstance(message, wire.Beat):
                self._beat(message)
            elif isinstance(message, wire.Encoded):
                future = self._calls.get(message.call)
                if future is not None and not future.done():
                    if message.error:
                        future.set_exception(wire.error_from(message.error, message.message))
                    else:
                        future.set_result(message.codes)

    def _item(self, item: wire.Item) -> None:
        items = self._streams.get(item.stream)
        if items is None:
            return  # a stream that left: its cancel is on the way
        if item.kind == wire.AUDIO:
            items.put_nowait((wire.AUDIO, np.frombuffer(item.audio, dtype=np.float32)))
            return
        del self._streams[item.stream]
        if item.kind == wire.END:
            items.put_nowait((wire.END, None))
        else:
            items.put_nowait((wire.ERROR, wire.error_from(item.error, item.message)))

    def _beat(self, beat: wire.Beat) -> None:
        self._last_beat = time.monotonic()
        if self._incarnation is not None and beat.incarnation != self._incarnation:
            self._fail_streams(ModelFailed("the engine restarted; the request was stopped, retry it"))
        if beat.incarnation == self._dead:
            return  # the last words of a process that is gone: wait for the next one
        if self._lost is not None or beat.incarnation != self._incarnation:
            log.info("engine %s (incarnation %d): %s", self.address, beat.incarnation,
                     "ready" if beat.ready else (beat.failed or "loading"))
        self._incarnation = beat.incarnation
        self._lost = None
        self._capacity = beat.capacity
        self.sample_rate = beat.sample_rate
        info = beat.info
        self.info.name, self.info.model = info.get("name", self.info.name), info.get("model", self.info.model)
        self.info.device, self.info.dtype = info.get("device", self.info.device), info.get("dtype", self.info.dtype)
        self.info.offline_model = bool(info.get("offline_model", False))
        self.info.extra.update(info.get("extra", {}))
        self.prefill_positions = info.get("prefill_positions", {})
        self.info.ready, self.info.failed = beat.ready, beat.failed
        self._changed.set()

    async def _keep_alive(self) -> None:
        """Say we are alive; notice when the engine is not."""
        timeout = self.settings.engine_heartbeat_timeout_s
        while True:
            await asyncio.sleep(wire.PING_S)
            self._send(wire.Hello(worker=str(os.getpid())))
            silent = time.monotonic() - self._last_beat
            if silent > timeout and self._lost is None and self._incarnation is not None:
                self._lose(f"the engine process has not answered for {silent:.0f} s; it is being restarted")

    def _lose(self, reason: str, dead: bool = False) -> None:
        """The engine is gone (for now): every stream in flight ends with ``reason``; not ready until it
        answers again (``dead``: its process exited, so only a new incarnation will)."""
        if dead:
            self._dead = self._incarnation
        if self._lost is not None:
            return
        self._lost = reason
        log.error("%s", reason)
        self.info.ready, self.info.failed = False, reason
        self._fail_streams(ModelFailed(reason))
        if self._changed is not None:
            self._changed.set()

    def _fail_streams(self, error: BaseException) -> None:
        streams, self._streams = self._streams, {}
        for items in streams.values():
            items.put_nowait((wire.ERROR, error))
        for future in self._calls.values():
            if not future.done():
                future.set_exception(error)


class ProcessEngine(EngineClient):
    """An :class:`EngineClient` that starts the engine process itself and keeps it running."""

    def __init__(self, settings: Settings, device: str | None = None):
        from csmserve.engine.supervisor import EngineSupervisor, engine_address

        super().__init__(settings, engine_address())
        self.supervisor = EngineSupervisor(settings, self.address, device=device, on_exit=self._exited)
        self._loop: asyncio.AbstractEventLoop | None = None

    def gave_up(self) -> str | None:
        return self.supervisor.gave_up

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.supervisor.start()
        await super().start()

    def _exited(self, reason: str) -> None:
        """The supervisor saw the process stop (its thread): the streams end now, not at the beat timeout."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._lose, reason, True)

    async def close(self) -> None:
        await super().close()
        await asyncio.to_thread(self.supervisor.stop)


class EngineGroup:
    """One engine per GPU behind one :class:`~csmserve.engine.Engine`: each request goes to the engine
    with the most free capacity; a text stream's requests stay on the engine that holds its state."""

    def __init__(self, engines: list):
        self.engines = engines
        self._info = EngineInfo(name=engines[0].info.name, model=engines[0].info.model)
        self._placed: dict[str, object] = {}

    @property
    def info(self) -> EngineInfo:
        """The group's state: ready while any engine is (refreshed at each read)."""
        self._refresh()
        return self._info

    @property
    def sample_rate(self) -> int:
        return self.engines[0].sample_rate

    def _refresh(self) -> None:
        info = self._info
        ready = [e for e in self.engines if e.info.ready]
        first = (ready or self.engines)[0].info
        info.name, info.model, info.device, info.dtype = first.name, first.model, first.device, first.dtype
        info.offline_model = first.offline_model
        info.extra = {**first.extra, "engines": len(self.engines), "engines_ready": len(ready)}
        info.ready = bool(ready)
        info.failed = None if ready else next((e.info.failed for e in self.engines if e.info.failed), None)

    def capacity(self) -> Capacity:
        capacities = [e.capacity() for e in self.engines]
        realtime = [c.realtime_streams for c in capacities if c.realtime_streams is not None]
        return Capacity(
            max_batch=sum(c.max_batch for c in capacities),
            active=sum(c.active for c in capacities),
            waiting=sum(c.waiting for c in capacities),
            steps=sum(c.steps for c in capacities),
            last_step_ms=max(c.last_step_ms for c in capacities),
            last_batch=sum(c.last_batch for c in capacities),
            last_step_cpu_ms=max(c.last_step_cpu_ms for c in capacities),
            last_step_device_ms=max((c.last_step_device_ms or 0.0) for c in capacities) or None,
            realtime_streams=sum(realtime) if realtime else None,
        )

    async def start(self) -> None:
        await asyncio.gather(*(engine.start() for engine in self.engines))

    async def close(self) -> None:
        await asyncio.gather(*(engine.close() for engine in self.engines))

    def _pick(self):
        ready = [e for e in self.engines if e.info.ready] or self.engines
        return max(ready, key=lambda e: _spare(e.capacity()))

    async def encode(self, audio: np.ndarray) -> np.ndarray:
        return await self._pick().encode(audio)

    def release(self, continuation: Continuation) -> None:
        engine = self._placed.pop(continuation.id, None)
        if engine is not None:
            engine.release(continuation)

    def synthesize(self, request: SynthesisRequest) -> AsyncIterator[np.ndarray]:
        engine = self._pick()
        if request.continuation is not None:
            engine = self._placed.setdefault(request.continuation.id, engine)
        return engine.synthesize(request)


def _spare(capacity: Capacity) -> int:
    """Rows an engine could give a new request now: free rows less the requests already waiting."""
    return capacity.free_slots - capacity.waiting


def _quiet(future) -> None:
    """A send's outcome: nothing to do (a closed socket during shutdown is not an error)."""
    if not future.cancelled():
        future.exception()
