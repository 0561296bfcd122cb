"""The engine in its own process: the model thread as in a single process, fed by API workers over ZeroMQ.

Why a process: the model thread must never wait for the interpreter lock while the API's per-frame
Python (encoding, resampling, WebSocket framing, JSON) runs for hundreds of streams; and a device that
fails can be restarted with the process while the API keeps its connections (vLLM's engine core does the
same for the same reasons).

Three threads here:

- the **model thread** (:class:`~csmserve.engine.worker.ModelWorker`), unchanged: it steps every stream
  and hands each step's items to an :class:`IpcSink` per API worker, which only queues them;
- the **I/O thread** (this module's main thread): one ROUTER socket for every API worker. It turns
  :mod:`~csmserve.engine.wire` messages into worker calls (submit, cancel, credit, release), sends each
  step's items as one message per API worker (encoding happens here, off the model thread), and a
  :class:`~csmserve.engine.wire.Beat` every ``BEAT_S`` with the engine's state and load;
- a **bridge thread** running an asyncio loop for the engine's own coroutines (loading, warm-up, voice
  encoding).

The process exits when told to (SIGTERM, :class:`~csmserve.engine.wire.Stop`), when its parent dies, when
the device fails for good (exit :data:`EXIT_DEVICE_FAILED`), when the model thread makes no progress
while work waits (exit :data:`EXIT_STALLED`) and, at start, when the model cannot be loaded (exit
:data:`EXIT_LOAD_FAILED`); the supervisor decides what follows.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import signal
import threading
import time
from typing import Any

import numpy as np

from csmserve.config import Settings
from csmserve.engine import wire
from csmserve.engine.watchdog import Watchdog
from csmserve.engine.worker import END, Failure, ModelWorker, Stream
from csmserve.errors import CsmServeError, NotReady, Overloaded

log = logging.getLogger(__name__)

EXIT_LOAD_FAILED = 2
EXIT_DEVICE_FAILED = 3
EXIT_STALLED = 4
#: API workers not heard from for this long are gone: their streams are cancelled.
WORKER_TIMEOUT_S = 5.0


def main(settings_json: str, address: str, incarnation: int, parent: int, device: str | None = None) -> None:
    """The engine process's entry point (spawned, never forked: CUDA must start fresh here)."""
    if device is not None:  # one engine per GPU: this process sees only its own
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    settings = Settings.model_validate_json(settings_json)
    from csmserve.logs import setup_logging

    setup_logging(settings.log_level, settings.log_format)
    code = EngineCore(settings, address, incarnation, parent).run()
    logging.shutdown()
    os._exit(code)  # the model thread is a daemon: do not wait on it


class IpcSink:
    """One API worker's streams: a step's items are queued for the I/O thread, which sends them as one
    message. Called on the model thread; never blocks."""

    def __init__(self, core: EngineCore, identity: bytes):
        self.core = core
        self.identity = identity

    def deliver(self, items: list[tuple[Stream, Any]]) -> None:
        self.core.outgoing(self.identity, items)


class EngineCore:
    """Serves one engine (the CSM model or the fake one) to the API workers connected at ``address``."""

    def __init__(self, settings: Settings, address: str, incarnation: int, parent: int):
        from csmserve.engine import create_local_engine

        self.settings = settings
        self.address = address
        self.incarnation = incarnation
        self.parent = parent
        self.engine = create_local_engine(settings)
        self.worker: ModelWorker = self.engine.worker
        self.codec = wire.Codec()
        #: Live streams by (API worker, stream id).
        self.streams: dict[tuple[bytes, int], Stream] = {}
        self.ids: dict[int, tuple[bytes, int]] = {}  # id(stream) -> key, for the items coming back
        self.sinks: dict[bytes, IpcSink] = {}
        self.heard: dict[bytes, float] = {}
        self.loaded = threading.Event()
        self.load_error: str | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_local = threading.local()
        self._stop = threading.Event()
        #: The same watch the API keeps: work waiting or generating, and no step for ``stall_timeout_s``.
        self.watchdog = Watchdog(self.engine.capacity, settings.stall_timeout_s, armed=lambda: self.engine.info.ready)

    # -- called from other threads ---------------------------------------------------------------------
    def outgoing(self, identity: bytes, items: list[tuple[Stream, Any]]) -> None:
        """Queue a step's items for ``identity`` and wake the I/O thread (model thread)."""
        self._queue.put(("items", identity, items))
        self._wake()

    def _wake(self) -> None:
        import zmq

        socket = getattr(self._wake_local, "socket", None)
        if socket is None:
            socket = self._wake_local.socket = self.context.socket(zmq.PUSH)
            socket.connect("inproc://wake")
        socket.send(b"", zmq.NOBLOCK)

    # -- the I/O thread ----------------------------------------------------------------------------------
    def run(self) -> int:
        import zmq

        self.context = zmq.Context()
        router = self.context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.bind(self.address)
        wake = self.context.socket(zmq.PULL)
        wake.bind("inproc://wake")
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        self.bridge = asyncio.new_event_loop()
        threading.Thread(target=self.bridge.run_forever, name="engine-bridge", daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._load(), self.bridge)
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        next_beat = 0.0
        code = 0
        try:
            while not self._stop.is_set():
                for socket, _ in poller.poll(timeout=1000 * wire.BEAT_S / 2):
                    if socket is wake:
                        while wake.poll(0):
                            wake.recv()
                    else:
                        while router.poll(0):
                            identity, data = router.recv_multipart()
                            self._handle(identity, data)
                self._send_queued(router)
                now = time.monotonic()
                if now >= next_beat:
                    next_beat = now + wire.BEAT_S
                    self._beat(router)
                    code = self._health(now)
                    if code:
                        break
        finally:
            self._fail_all("the engine is stopping")
            self._send_queued(router)
            self.worker.stop(timeout=2)
            router.close(linger=100)
            wake.close(linger=0)
        return code

    async def _load(self) -> None:
        try:
            await self.engine.start()
        except CsmServeError as exc:
            self.load_error = exc.message
        except Exception as exc:  # noqa: BLE001 - any failure here is a load failure, said as such
            log.exception("model load failed")
            self.load_error = f"model load failed: {type(exc).__name__}: {exc}"
        self.loaded.set()

    def _health(self, now: float) -> int:
        """The exit code to stop with now, or 0 (load failed, device failed, stalled, parent gone)."""
        if self.load_error is not None:
            log.error("model load failed: %s", self.load_error)
            return EXIT_LOAD_FAILED
        if self.worker.fatal:
            log.error("%s; the engine process exits so that it can be restarted", self.worker.fatal)
            return EXIT_DEVICE_FAILED
        if os.getppid() != self.parent:
            log.warning("the server that started the engine is gone; stopping")
            return 1
        for identity, heard in list(self.heard.items()):
            if now - heard > WORKER_TIMEOUT_S:
                self._forget_worker(identity)
        if self.watchdog.stalled() is not None:  # the watchdog has logged why
            log.error("the engine process exits so that it can be restarted")
            return EXIT_STALLED
        return 0

    def _beat(self, router) -> None:
        info = self.engine.info
        beat = wire.Beat(
            incarnation=self.incarnation,
            ready=info.ready,
            failed=self.load_error or info.failed or self.worker.fatal,
            info={"name": info.name, "model": info.model, "device": info.device, "dtype": info.dtype,
                  "offline_model": info.offline_model, "extra": {**info.extra, "engine_pid": os.getpid()},
                  "prefill_positions": dict(getattr(self.engine, "prefill_positions", {}))},
            sample_rate=int(self.engine.sample_rate),
            capacity=self.engine.capacity(),
        )
        data = self.codec.encode(beat)
        for identity in list(self.heard):
            router.send_multipart([identity, data])

    def _handle(self, identity: bytes, data: bytes) -> None:
        try:
            message = self.codec.inbound(data)
        except Exception:  # noqa: BLE001 - a bad message is dropped, never fatal
            log.exception("dropped a message the engine could not read")
            return
        self.heard[identity] = time.monotonic()
        if isinstance(message, wire.Submit):
            self._submit(identity, message)
        elif isinstance(message, wire.Credit):
            for number, frames in message.grants:
                stream = self.streams.get((identity, number))
                if stream is not None:
                    self.worker.grant(stream, frames)
        elif isinstance(message, wire.Cancel):
            stream = self.streams.get((identity, message.stream))
            if stream is not None:
                self.worker.cancel(stream)
        elif isinstance(message, wire.Release):
            self.worker.release(message.continuation)
        elif isinstance(message, wire.Encode):
            self._encode(identity, message)
        elif isinstance(message, wire.Bye):
            self._forget_worker(identity)
        elif isinstance(message, wire.Stop):
            self._stop.set()

    def _submit(self, identity: bytes, message: wire.Submit) -> None:
        key = (identity, message.stream)
        sink = self.sinks.get(identity)
        if sink is None:
            sink = self.sinks[identity] = IpcSink(self, identity)
        stream = self.worker.new_stream(message.request, sink)
        self.ids[id(stream)] = key  # until its last item is sent, a failure's too
        try:
            if not self.engine.info.ready:
                raise NotReady()
            limit = self.settings.resolved_max_streams(self.worker.scheduler.max_batch)
            if len(self.streams) >= limit:  # every API worker together (each also admits on its own)
                raise Overloaded(f"{limit} requests are streaming already; retry shortly")
            self.streams[key] = stream
            request = message.request
            if any(t.codes is None and t.audio is not None for t in (*request.voice, *request.context)):
                self._prepare_then_submit(identity, stream)  # a client's turn given as audio: encode it first
            else:
                self.worker.submit(stream)
        except CsmServeError as exc:
            self.streams.pop(key, None)
            self._queue.put(("items", identity, [(stream, Failure(exc))]))

    def _prepare_then_submit(self, identity: bytes, stream: Stream) -> None:
        """Encode the audio of ``stream``'s turns on the engine's encoder (never between steps), then queue it."""
        prepared = getattr(self.engine, "prepared", None)
        if prepared is None:
            self.worker.submit(stream)
            return
        future = asyncio.run_coroutine_threadsafe(prepared(stream.request), self.bridge)

        def done(result) -> None:
            try:
                stream.request = result.result()
                self.worker.submit(stream)
            except Exception as exc:  # noqa: BLE001 - this request fails, the engine goes on
                self._queue.put(("items", identity, [(stream, Failure(exc))]))
                self._wake()

        future.add_done_callback(done)

    def _encode(self, identity: bytes, message: wire.Encode) -> None:
        future = asyncio.run_coroutine_threadsafe(self.engine.encode(message.audio), self.bridge)

        def done(result) -> None:
            try:
                reply = wire.Encoded(message.call, codes=np.asarray(result.result()))
            except CsmServeError as exc:
                reply = wire.Encoded(message.call, error=type(exc).__name__, message=exc.message)
            except Exception as exc:  # noqa: BLE001 - the caller gets the error, the engine goes on
                reply = wire.Encoded(message.call, error="GenerationFailed", message=f"encoding failed: {exc}")
            self._queue.put(("reply", identity, reply))
            self._wake()

        future.add_done_callback(done)

    def _send_queued(self, router) -> None:
        """Everything the model thread and the bridge queued: one message per API worker."""
        by_identity: dict[bytes, list[wire.Item]] = {}
        replies = []
        while True:
            try:
                kind, identity, payload = self._queue.get_nowait()
            except queue.Empty:
                break
            if kind == "reply":
                replies.append((identity, payload))
                continue
            out = by_identity.setdefault(identity, [])
            for stream, item in payload:
                key = self.ids.get(id(stream))
                if key is None:
                    continue
                if item is END:
                    out.append(wire.Item(key[1], wire.END))
                elif isinstance(item, Failure):
                    out.append(wire.error_item(key[1], item.error))
                else:
                    out.append(wire.Item(key[1], wire.AUDIO, np.asarray(item, dtype=np.float32).tobytes()))
                    continue
                self.ids.pop(id(stream), None)
                self.streams.pop(key, None)
        capacity = self.engine.capacity() if by_identity else None
        for identity, items in by_identity.items():
            if items:
                router.send_multipart([identity, self.codec.encode(wire.Step(items, capacity))])
        for identity, reply in replies:
            router.send_multipart([identity, self.codec.encode(reply)])

    def _forget_worker(self, identity: bytes) -> None:
        """An API worker left or died: its streams stop."""
        self.heard.pop(identity, None)
        for key, stream in list(self.streams.items()):
            if key[0] == identity:
                self.worker.cancel(stream)

    def _fail_all(self, reason: str) -> None:
        from csmserve.errors import ModelFailed

        for key, stream in list(self.streams.items()):
            self.worker.cancel(stream)
            self._queue.put(("items", key[0], [(stream, Failure(ModelFailed(reason)))]))
