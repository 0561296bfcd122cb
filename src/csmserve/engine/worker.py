"""The one thread that owns the model: it runs every active stream in batched steps, and hands each
stream's audio to its coroutine without ever waiting on one.

The event loop never runs the model. ``stream(request)`` queues a request (bounded: a full queue is
:class:`Overloaded`; only live requests count, and a cancelled one leaves the queue at once); the thread
admits it into a free slot when there is one, the tenants taking turns
(:class:`~csmserve.engine.intake.Intake`: the fewest rows first, then round-robin), and from then on each
step of the :class:`~csmserve.engine.scheduler.Scheduler`'s plan gives it one frame (or one chunk of
its prompt's prefill). A frame goes to the stream's bounded channel only when the stream has credit
(room in its channel); a stream without credit sits the step out but keeps its slot, so one slow
reader never slows the batch, and after ``max_lag_s`` without credit it is dropped
(:class:`ClientTooSlow`). Cancelling (closing the iterator) frees the row at the next step.

A step's frames reach their consumers in one hand-over per :class:`Sink` per step: in this process, one
``call_soon_threadsafe`` per event loop, fanned out to the streams' channels there (per-row wake-ups of
the loop would cost the model thread the interpreter lock once per row); in the engine process
(``core.py``), one message per API worker. Each step's wall time, the thread's CPU time and the device's time
are kept for ``/metrics``: wall minus CPU is time spent waiting (for the device, or for the lock).

An exception in a step ends the streams in that step with an error (classified: out of memory frees
memory, a CUDA error marks the engine failed) and the worker goes on with the others and new ones.

The model is plugged in as a :class:`StepModel`: the CSM adaptor (``csm.py``) or the fake tone
generator (``fake.py``), so the server sees the same shape of work with either.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from csmserve.engine import Capacity, SynthesisRequest
from csmserve.engine.intake import Intake
from csmserve.engine.scheduler import Piece, Row, Scheduler, SlotCopy, StepPlan
from csmserve.errors import (
    ClientTooSlow,
    CsmServeError,
    GenerationFailed,
    ModelFailed,
    NotReady,
    OutOfMemory,
    Overloaded,
)

log = logging.getLogger(__name__)

#: The last item of a stream that ended well.
END = object()
#: How long the idle thread sleeps between checks for cancelled or stalled streams.
_TICK_S = 0.05


@dataclass
class Failure:
    """The last item of a stream that failed."""

    error: BaseException


@dataclass
class Frame:
    """One frame a model made for a row: its codebook ids (the prefix cache's identity of the position
    it is fed back at) and its audio, float32 mono."""

    codes: list[int]
    audio: np.ndarray


class StepModel(Protocol):
    """What the worker needs from a model. Every method runs on the worker thread."""

    def next_piece(self, stream: Stream) -> Piece | None:
        """The stream's next piece (the first when none has run), or ``None`` when its request is done."""

    def enter(self, stream: Stream, slot: int) -> None:
        """``stream`` starts on ``slot`` (set up per-slot state: the codec's)."""

    def start_piece(self, row: Row) -> None:
        """``row``'s current piece starts on its slot (per-piece state: its sampling settings)."""

    def copy(self, copies: list[SlotCopy]) -> None:
        """Copy slots' cached positions (and, for a moving row, its per-slot state), in order."""

    def prefill(self, chunks: list[tuple[Row, int, int]]) -> None:
        """Compute prompt positions ``start .. start+length-1`` of each ``(row, start, length)``'s piece."""

    def decode(self, rows: list[Row]) -> list[Frame | None]:
        """One frame for each row (``None``: the row's piece ended, end of audio). Sets
        ``last_device_ms`` where the device's time is known."""

    def leave(self, stream: Stream, slot: int) -> None:
        """``stream`` leaves ``slot`` (keep what its continuation needs)."""


class Sink(Protocol):
    """Where a stream's items go: ``deliver`` gets one step's items for all of its streams at once (on
    the worker thread; it must not block). An item is a float32 audio frame, :data:`END` or a
    :class:`Failure`."""

    def deliver(self, items: list[tuple[Stream, Any]]) -> None: ...


class LoopSink:
    """Streams consumed by coroutines on ``loop``: one ``call_soon_threadsafe`` per step puts every item
    into its stream's ``channel``."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop

    def deliver(self, items: list[tuple[Stream, Any]]) -> None:
        try:
            self.loop.call_soon_threadsafe(_deliver, items)
        except RuntimeError:  # the loop is closed: nobody is listening
            for stream, _ in items:
                stream.cancelled.set()


@dataclass(eq=False)
class Stream:
    """One request crossing to the worker and its audio going back. ``credit``: frames the consumer has
    room for (the consumer releases one per frame it takes); ``channel``: the items, for a
    :class:`LoopSink`'s consumer; ``state``: the model's own data; ``carry``: what the request's
    continuation carries between requests (:class:`ContinuationStore`; the model's to fill)."""

    request: SynthesisRequest
    sink: Sink
    credit: threading.Semaphore
    channel: asyncio.Queue | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    state: Any = None
    carry: dict = field(default_factory=dict)
    stalled_since: float | None = None
    frames: int = 0


class ContinuationStore:
    """What each text stream carries between its requests, by :class:`~csmserve.engine.Continuation` id
    (the model's own objects: a codec state, the previous sentence). Worker thread only; the least
    recently used are forgotten beyond ``limit``."""

    def __init__(self, limit: int = 4096):
        self.limit = limit
        self._items: OrderedDict[str, dict] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, continuation) -> dict:
        """The mutable state of ``continuation`` (a new empty one the first time); ``{}`` for ``None``."""
        if continuation is None:
            return {}
        state = self._items.get(continuation.id)
        if state is None:
            state = self._items[continuation.id] = {}
            while len(self._items) > self.limit:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(continuation.id)
        return state

    def release(self, continuation_id: str) -> None:
        self._items.pop(continuation_id, None)


class ModelWorker:
    """A daemon thread running batched steps for up to ``max_batch`` streams; ``max_queued`` may wait."""

    def __init__(
        self,
        model: StepModel | None = None,
        *,
        name: str = "csm-worker",
        max_batch: int = 1,
        max_queued: int = 64,
        prefill_chunk: int = 256,
        prefix_reuse: bool = True,
        max_lag_s: float = 10.0,
        max_buffered: int = 8,
        setup: Callable[[], None] | None = None,
    ):
        self.model = model
        self.scheduler = Scheduler(max_batch, prefill_chunk, prefix_reuse)
        self.max_lag_s = max_lag_s
        self.max_buffered = max_buffered
        #: Streams waiting for a row, one line per tenant (live ones only count toward ``max_queued``).
        self._streams = Intake(maxsize=max_queued)
        self._calls: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._wake = threading.Event()
        self._setup = setup
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = False
        self._stopping = False
        #: Set when the device failed for good (a CUDA error): the engine reports it as not ready.
        self.fatal: str | None = None
        self.steps = 0
        self.last_step_ms = 0.0
        self.last_step_cpu_ms = 0.0
        self.last_step_device_ms: float | None = None
        self.last_batch = 0
        #: Streams the device holds in real time (set by the engine after it measured its steps).
        self.realtime_streams: int | None = None
        #: Items for the sinks, handed over once per step (:meth:`_flush`).
        self._outbox: list[tuple[Stream, Any]] = []
        self._sinks: dict[asyncio.AbstractEventLoop, LoopSink] = {}
        #: Each text stream's state between its requests (the model's; worker thread only).
        self.continuations = ContinuationStore()
        self._released: queue.SimpleQueue[str] = queue.SimpleQueue()

    def attach(self, model: StepModel, max_batch: int, prefill_chunk: int | None = None) -> None:
        """Serve ``model`` with ``max_batch`` rows and ``prefill_chunk`` prompt positions per step (once the
        model is loaded and its device known); on the worker thread, before any stream is admitted."""
        self.model = model
        self.scheduler = Scheduler(max_batch, prefill_chunk or self.scheduler.chunk, self.scheduler.reuse)

    def resize_queue(self, max_queued: int) -> None:
        """Let ``max_queued`` requests wait (the default follows the batch, known once the model is loaded)."""
        self._streams.maxsize = max_queued

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._started:
            self._stopping = True
            self._calls.put(None)
            self._wake.set()
            self._thread.join(timeout)

    def capacity(self) -> Capacity:
        rows = list(self.scheduler.rows)
        prefilling = sum(1 for row in rows if row.prefilling)
        return Capacity(
            max_batch=self.scheduler.max_batch,
            active=len(rows),
            waiting=self._streams.qsize() + prefilling,
            steps=self.steps,
            last_step_ms=self.last_step_ms,
            last_batch=self.last_batch,
            last_step_cpu_ms=self.last_step_cpu_ms,
            last_step_device_ms=self.last_step_device_ms,
            realtime_streams=self.realtime_streams,
        )

    # -- the loop's side ----------------------------------------------------------------------------
    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` on the worker thread (between two steps) and return its result."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def run() -> None:
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                loop.call_soon_threadsafe(_settle, future, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)

        self._calls.put(run)
        self._wake.set()
        return await future

    def submit(self, stream: Stream) -> None:
        """Queue ``stream`` for a row (thread-safe); raises :class:`Overloaded` when the queue is full."""
        try:
            self._streams.put_nowait(stream)
        except queue.Full:
            raise Overloaded("the server is busy; try again shortly") from None
        self._wake.set()

    def cancel(self, stream: Stream) -> None:
        """Stop ``stream`` (thread-safe): its row is freed at the next step."""
        stream.cancelled.set()
        self._wake.set()

    def grant(self, stream: Stream, frames: int = 1) -> None:
        """The consumer took ``frames`` frames (thread-safe): room for as many more."""
        stream.credit.release(frames)
        self._wake.set()

    def release(self, continuation_id: str) -> None:
        """Forget a text stream's carried state (thread-safe; done between two steps)."""
        self._released.put(continuation_id)

    def new_stream(self, request: SynthesisRequest, sink: Sink) -> Stream:
        """A stream for ``request`` delivering to ``sink``, with credit for ``max_buffered`` frames."""
        return Stream(request, sink, threading.Semaphore(self.max_buffered))

    async def stream(self, request: SynthesisRequest) -> AsyncIterator[np.ndarray]:
        """Queue ``request`` and yield its audio as it comes. Raises :class:`Overloaded` when the queue
        is full, the step's :class:`CsmServeError` when generation fails. Safe to cancel: leaving the
        loop early frees the stream's row at the next step."""
        loop = asyncio.get_running_loop()
        sink = self._sinks.get(loop)
        if sink is None:
            sink = self._sinks[loop] = LoopSink(loop)
        stream = self.new_stream(request, sink)
        stream.channel = asyncio.Queue(maxsize=self.max_buffered + 2)  # credit bounds the frames; + the end
        self.submit(stream)
        try:
            while True:
                item = await stream.channel.get()
                if item is END:
                    return
                if isinstance(item, Failure):
                    raise item.error
                self.grant(stream)
                yield item
        finally:
            self.cancel(stream)

    # -- the worker thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        if self._setup is not None:
            self._setup()
        while not self._stopping:
            self._run_calls()
            if self._stopping:
                self._flush()
                return
            self._drop_cancelled_and_stalled()
            self._admit()
            plan = self.scheduler.plan(self._take_credit)
            if plan.empty:
                self._flush()
                self._wake.wait(_TICK_S)
                self._wake.clear()
                self.steps += 1  # alive and idle: progress for the watchdog
                continue
            started, cpu = time.perf_counter(), time.thread_time()
            self._step(plan)
            self._flush()
            self.last_step_ms = 1000 * (time.perf_counter() - started)
            self.last_step_cpu_ms = 1000 * (time.thread_time() - cpu)
            self.last_step_device_ms = getattr(self.model, "last_device_ms", None)
            self.last_batch = len(plan.decode)
            self.steps += 1

    def _run_calls(self) -> None:
        while True:
            try:
                self.continuations.release(self._released.get_nowait())
            except queue.Empty:
                break
        while True:
            try:
                call = self._calls.get_nowait()
            except queue.Empty:
                return
            if call is None:
                self._stopping = True
                self._fail_all(NotReady("the server is shutting down"))
                return
            call()

    def _admit(self) -> None:
        """Drop cancelled requests from the queue (a cancel wakes the thread), then fill free slots from
        it: the tenant with the fewest rows first, then in turn."""
        self._streams.purge()
        rows = Counter(row.stream.request.tenant for row in self.scheduler.rows)
        while self.scheduler.free_slots():
            try:
                stream = self._streams.get_nowait(rows.__getitem__)
            except queue.Empty:
                return
            if stream.cancelled.is_set():  # cancelled since the line was purged
                continue
            stream.carry = self.continuations.get(stream.request.continuation)
            rows[stream.request.tenant] += 1
            row = Row(stream)
            try:
                piece = self.model.next_piece(stream)
                if piece is None:
                    self._send(stream, END)
                    continue
                self.scheduler.place(row, piece)
                self.model.enter(stream, row.slot)
                self.model.start_piece(row)
            except BaseException as exc:  # noqa: BLE001 - this request fails, the worker goes on
                self._end(row, self._classify(exc))

    def _take_credit(self, row: Row) -> bool:
        stream = row.stream
        if stream.credit.acquire(blocking=False):
            stream.stalled_since = None
            return True
        if stream.stalled_since is None:
            stream.stalled_since = time.monotonic()
        return False

    def _drop_cancelled_and_stalled(self) -> None:
        now = time.monotonic()
        for row in list(self.scheduler.rows):
            stream = row.stream
            if stream.cancelled.is_set():
                self._end(row, None)
            elif stream.stalled_since is not None and now - stream.stalled_since > self.max_lag_s:
                self._end(row, ClientTooSlow(f"the client read no audio for {self.max_lag_s:g} s; its stream was dropped"))

    def _step(self, plan: StepPlan) -> None:
        rows = list(dict.fromkeys([*plan.decode, *(row for row, _, _ in plan.prefill)]))
        try:
            if plan.copies:
                self.model.copy(plan.copies)
            if plan.prefill:
                self.model.prefill(plan.prefill)
                for row, start, length in plan.prefill:
                    self.scheduler.prefilled(row, start, length)
            frames = self.model.decode(plan.decode) if plan.decode else []
        except BaseException as exc:  # noqa: BLE001 - the step's streams fail, the worker goes on
            error = self._classify(exc)
            log.error("step failed for %d streams: %s", len(rows), error.message, exc_info=not isinstance(exc, CsmServeError))
            for row in rows:
                self._end(row, error, keep_cache=False)
            return
        for row, frame in zip(plan.decode, frames):
            if frame is None:
                row.stream.credit.release()  # nothing was sent
                self._next_piece(row)
                continue
            self.scheduler.decoded(row, frame.codes)
            row.stream.frames += 1
            self._send(row.stream, frame.audio)
            if row.frames >= row.piece.max_frames:
                self._next_piece(row)

    def _next_piece(self, row: Row) -> None:
        try:
            piece = self.model.next_piece(row.stream)
        except BaseException as exc:  # noqa: BLE001
            self._end(row, self._classify(exc))
            return
        if piece is None:
            self._end(row, None)
            return
        try:
            self.scheduler.begin(row, piece)
            self.model.start_piece(row)
        except BaseException as exc:  # noqa: BLE001
            self._end(row, self._classify(exc))

    def _end(self, row: Row, error: CsmServeError | None, *, keep_cache: bool = True) -> None:
        """The stream is done (``error``: how it failed): free its row and tell its consumer."""
        if row.slot >= 0 and row in self.scheduler.rows:
            try:
                self.model.leave(row.stream, row.slot)
            except BaseException:  # noqa: BLE001 - leaving must never stop the worker
                log.exception("freeing a stream's slot failed")
                keep_cache = False
        self.scheduler.release(row, keep_cache=keep_cache)
        self._send(row.stream, END if error is None else Failure(error))

    def _fail_all(self, error: CsmServeError) -> None:
        for row in list(self.scheduler.rows):
            self._end(row, error)
        while True:
            try:
                self._send(self._streams.get_nowait(), Failure(error))
            except queue.Empty:
                return

    def _send(self, stream: Stream, item: Any) -> None:
        """Queue ``item`` for ``stream``'s channel; :meth:`_flush` hands the step's items over at once."""
        self._outbox.append((stream, item))

    def _flush(self) -> None:
        """Hand every queued item to its stream's sink: one hand-over per sink."""
        if not self._outbox:
            return
        by_sink: dict[int, tuple[Sink, list[tuple[Stream, Any]]]] = {}
        for stream, item in self._outbox:
            by_sink.setdefault(id(stream.sink), (stream.sink, []))[1].append((stream, item))
        self._outbox = []
        for sink, items in by_sink.values():
            try:
                sink.deliver(items)
            except Exception:  # noqa: BLE001 - one sink's failure must not stop the worker
                log.exception("delivering a step's items failed")
                for stream, _ in items:
                    stream.cancelled.set()

    def _classify(self, exc: BaseException) -> CsmServeError:
        """Map a step's exception to the error its clients get; free memory after an OOM."""
        if isinstance(exc, CsmServeError):
            return exc
        if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower():
            import sys

            torch = sys.modules.get("torch")
            if torch is not None and torch.cuda.is_available():
                torch.cuda.empty_cache()
            return OutOfMemory("out of memory while generating; the streams in that step were stopped and memory freed, retry")
        if "CUDA error" in str(exc) or "device-side assert" in str(exc):
            self.fatal = f"the GPU failed: {exc}"
            return ModelFailed(f"the GPU failed ({exc}); the server needs a restart")
        return GenerationFailed(f"generation failed: {type(exc).__name__}: {exc}")


def _deliver(items: list[tuple[Stream, Any]]) -> None:
    """On the event loop: each item into its stream's channel (credit guarantees room). A
    :class:`LoopSink`'s hand-over."""
    for stream, item in items:
        try:
            stream.channel.put_nowait(item)
        except asyncio.QueueFull:  # never: credit bounds the frames; the others must still get theirs
            log.error("a stream's channel overflowed; an item was dropped")


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


async def synthesize_on(worker: ModelWorker, info, request: SynthesisRequest) -> AsyncIterator[np.ndarray]:
    """An engine's ``synthesize``: refuse before the model is ready, stream the request's audio, and mark
    the engine failed (``info.failed``) once the device has failed for good."""
    if not info.ready:
        raise NotReady()
    try:
        async for item in worker.stream(request):
            yield item
    finally:
        if worker.fatal:
            info.failed = worker.fatal
