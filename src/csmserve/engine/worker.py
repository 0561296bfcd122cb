"""The one thread that owns the model, and the bounded channels that carry its output to the loop.

The event loop never runs the model. Each request is a job: a function that, given a cancel flag,
returns an iterator of items (audio pieces). The worker runs jobs one at a time, in order, and hands
each item to the requesting coroutine through a bounded ``asyncio.Queue``; a consumer that falls
behind makes the worker wait (backpressure). Cancellation is a flag checked between two items, so
at most one more frame is computed after a cancel.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from csmserve.errors import CsmServeError, GenerationFailed, ModelFailed, NotReady, OutOfMemory, Overloaded

log = logging.getLogger(__name__)

_END = object()


@dataclass
class _Failure:
    error: BaseException


@dataclass
class Job:
    make_items: Callable[[threading.Event], Iterator[Any]]
    channel: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    cancelled: threading.Event = field(default_factory=threading.Event)
    #: Items the worker produced for this job (read by tests and metrics).
    produced: int = 0


class ModelWorker:
    """A daemon thread running jobs from a bounded queue. ``max_queued`` jobs may wait."""

    def __init__(self, name: str = "csm-worker", max_queued: int = 64, setup: Callable[[], None] | None = None):
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queued)
        self._setup = setup
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = False
        #: Set when the device failed for good (a CUDA error): the engine reports it as not ready.
        self.fatal: str | None = None
        self._running = False
        #: Items produced by all jobs (monotonic: progress for the watchdog), and the last one's duration.
        self.steps = 0
        self.last_step_ms = 0.0

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._started:
            self._jobs.put(None)
            self._thread.join(timeout)

    @property
    def queued(self) -> int:
        return self._jobs.qsize()

    def capacity(self):
        """The worker's work as a :class:`~csmserve.engine.Capacity`: one request at a time."""
        from csmserve.engine import Capacity

        return Capacity(
            max_batch=1, active=int(self._running), waiting=self.queued, steps=self.steps,
            last_step_ms=self.last_step_ms, last_batch=int(self._running),
        )

    @property
    def busy(self) -> bool:
        """Whether a job is running now."""
        return self._running

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` on the worker thread (after queued jobs) and return its result."""
        results = [item async for item in self.stream(lambda _cancel: iter([fn()]))]
        return results[0] if results else None

    async def stream(
        self, make_items: Callable[[threading.Event], Iterator[Any]], max_buffered: int = 8
    ) -> AsyncIterator[Any]:
        """Submit a job and yield its items as they come. Raises :class:`Overloaded` when the queue
        is full, :class:`GenerationFailed` (or the job's own :class:`CsmServeError`) when it raises.
        Safe to cancel: leaving the loop early cancels the job between two items."""
        job = Job(make_items, asyncio.Queue(maxsize=max_buffered), asyncio.get_running_loop())
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise Overloaded("the server is busy; try again shortly") from None
        try:
            while True:
                item = await job.channel.get()
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                yield item
        finally:
            job.cancelled.set()

    # -- worker thread -----------------------------------------------------------------------
    def _run(self) -> None:
        if self._setup is not None:
            self._setup()
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():
                continue
            self._running = True
            try:
                items = job.make_items(job.cancelled)
                try:
                    started = time.monotonic()
                    for item in items:  # the cancel flag is checked between two items (frames)
                        job.produced += 1
                        self.steps += 1
                        self.last_step_ms = 1000 * (time.monotonic() - started)
                        if job.cancelled.is_set() or not self._deliver(job, item):
                            break
                        started = time.monotonic()
                finally:
                    close = getattr(items, "close", None)
                    if close is not None:
                        close()
                self._deliver(job, _END)
            except BaseException as exc:  # noqa: BLE001 - a failing job must not kill the worker
                error = self._classify(exc)
                log.error("job failed: %s", error.message, exc_info=not isinstance(exc, CsmServeError))
                self._deliver(job, _Failure(error))
            finally:
                self._running = False

    def _classify(self, exc: BaseException) -> CsmServeError:
        """Map a job's exception to the error its client gets; free memory after an OOM."""
        if isinstance(exc, CsmServeError):
            return exc
        if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower():
            import sys

            torch = sys.modules.get("torch")
            if torch is not None and torch.cuda.is_available():
                torch.cuda.empty_cache()
            return OutOfMemory("out of memory while generating this request; it was stopped and memory freed, retry")
        if "CUDA error" in str(exc) or "device-side assert" in str(exc):
            self.fatal = f"the GPU failed: {exc}"
            return ModelFailed(f"the GPU failed ({exc}); the server needs a restart")
        return GenerationFailed(f"generation failed: {type(exc).__name__}: {exc}")

    def _deliver(self, job: Job, item: Any) -> bool:
        """Hand ``item`` to the job's consumer, waiting while its channel is full. False if cancelled."""
        try:
            future = asyncio.run_coroutine_threadsafe(job.channel.put(item), job.loop)
        except RuntimeError:  # the loop is closed
            return False
        while True:
            try:
                future.result(timeout=0.05)
                return True
            except concurrent.futures.TimeoutError:
                if job.cancelled.is_set():
                    future.cancel()
                    return False
            except (concurrent.futures.CancelledError, RuntimeError):
                return False


async def synthesize_on(worker: ModelWorker, info, make_items: Callable[[threading.Event], Iterator[Any]]) -> AsyncIterator[Any]:
    """An engine's ``synthesize``: refuse before the model is ready, stream the job's items, and mark
    the engine failed (``info.failed``) once the device has failed for good."""
    if not info.ready:
        raise NotReady("the model is still loading; retry when /health says healthy")
    try:
        async for item in worker.stream(make_items):
            yield item
    finally:
        if worker.fatal:
            info.failed = worker.fatal
