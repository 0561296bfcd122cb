"""Audio to codec codes on a thread of its own, so that encoding never pauses the talking streams.

Encoding a voice's reference clip (up to ``max_voice_seconds``) or a client's context turn runs the
codec's whole encoder over the clip: on the model thread, between two steps, every talking stream
would wait for it. :class:`Encoder` runs those calls on one thread beside the model thread, one at a
time, in order, at a lower scheduling priority (``nice`` +10 for the thread and the threads it starts,
on Linux), so the model's steps come first when both want the CPU. A GPU engine runs its encodes on a
CUDA stream of their own (``CsmSteps.encode_audio``).

Sharing the model's weights between the two threads is safe: encoding only reads the codec's encoder
and quantizer weights, computes under ``torch.inference_mode`` (thread-local), and keeps no state
between calls (no padding cache, no streaming: the batched decoder's per-slot state lives in its own
tensors, :mod:`csmserve.engine.mimi_stream`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from csmserve.errors import Overloaded

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Niceness added to the encoder thread (and the threads it starts: torch's intra-op pool).
NICENESS = 10


class Encoder:
    """One thread running encode calls in order; at most ``max_waiting`` wait or run (then :class:`Overloaded`)."""

    def __init__(self, *, name: str = "csm-encoder", max_waiting: int = 64):
        self.max_waiting = max_waiting
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=lower_priority)
        #: Calls submitted and not yet finished (event loop only).
        self.waiting = 0

    def stop(self) -> None:
        """Finish the running call, drop the waiting ones."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the encoder thread, after the calls already waiting: its result or its exception.
        Raises :class:`Overloaded` when ``max_waiting`` calls are waiting already. Safe to cancel: a call
        that has not started never runs (one that has finishes, its result dropped)."""
        if self.waiting >= self.max_waiting:
            raise Overloaded("too many clips are waiting to be encoded; retry shortly")
        self.waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn)
        finally:
            self.waiting -= 1


def lower_priority() -> None:
    """Lower the calling thread's scheduling priority by :data:`NICENESS` on Linux, where a thread has
    its own niceness and the threads it starts inherit it (elsewhere ``PRIO_PROCESS`` names a process,
    not a thread: nothing changes)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + NICENESS)
    except OSError as exc:
        log.debug("could not lower the encoder thread's priority: %s", exc)
