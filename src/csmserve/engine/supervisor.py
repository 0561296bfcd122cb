"""Starts the engine process and keeps it running.

The engine is spawned (never forked: a parent that touched CUDA cannot fork a child that uses it) with
the server's settings, and watched from a thread: when it exits on its own (a dead GPU, a stall it
detected itself, a crash, ``kill -9``) it is started again after a bounded back-off (2, 4, 8 ... 30 s),
each time as a new incarnation, while the API keeps its connections and answers 503 with the reason.
A model that cannot be loaded at the first start is a configuration error: the supervisor gives up and
says why (``gave_up``), and the server exits non-zero as it does without an engine process.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import tempfile
import threading
import time
import uuid

from csmserve.config import Settings

log = logging.getLogger(__name__)

#: Back-off between restarts: the first wait, and the longest.
FIRST_BACKOFF_S = 2.0
MAX_BACKOFF_S = 30.0
#: An engine that ran this long counts as healthy: the next failure starts the back-off afresh.
HEALTHY_AFTER_S = 60.0


def engine_address() -> str:
    """A fresh ``ipc://`` address in the temporary directory (unique per engine)."""
    return f"ipc://{tempfile.gettempdir()}/csmserve-engine-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class EngineSupervisor:
    """Runs the engine process for ``settings`` at ``address`` (``device``: the GPU it may see)."""

    def __init__(self, settings: Settings, address: str, device: str | None = None, on_exit=None):
        """``on_exit(reason)``: called (on the supervisor's thread) as soon as the engine process stops on
        its own, before it is restarted."""
        self.settings = settings
        self.on_exit = on_exit
        self.address = address
        self.device = device
        self.incarnation = 0
        self.process: multiprocessing.Process | None = None
        #: Why the engine will not come (a load failure at the first start); None while it may.
        self.gave_up: str | None = None
        #: Restarts so far (after the first start).
        self.restarts = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._context = multiprocessing.get_context("spawn")

    def start(self) -> None:
        self._spawn()
        self._thread = threading.Thread(target=self._watch, name="engine-supervisor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the engine (SIGTERM, then SIGKILL after ``timeout``) and stop watching it. Only the
        watching thread waits on the process (two waiters on one child confuse each other)."""
        self._stopping.set()
        process = self.process
        if process is not None and process.exitcode is None:
            process.terminate()
            if self._thread is not None:
                self._thread.join(timeout)
            if process.exitcode is None:
                log.warning("the engine process did not stop within %.0f s; killing it", timeout)
                process.kill()
        if self._thread is not None:
            self._thread.join(5)
        path = self.address.removeprefix("ipc://")
        if path != self.address and os.path.exists(path):
            os.unlink(path)

    def _spawn(self) -> None:
        from csmserve.engine import core

        self.incarnation += 1
        self.process = self._context.Process(
            target=core.main,
            args=(self.settings.model_dump_json(), self.address, self.incarnation, os.getpid(), self.device),
            name=f"csmserve-engine{'' if self.device is None else '-' + self.device}",
            daemon=False,
        )
        self.process.start()
        log.info("engine process %d started (incarnation %d, %s)", self.process.pid, self.incarnation, self.address)

    def _watch(self) -> None:
        from csmserve.engine import core

        backoff = FIRST_BACKOFF_S
        while not self._stopping.is_set():
            process = self.process
            started = time.monotonic()
            process.join()
            if self._stopping.is_set():
                return
            code = process.exitcode
            if code == core.EXIT_LOAD_FAILED and self.incarnation == 1:
                self.gave_up = "the model could not be loaded (the reason is in the log above)"
                log.error("engine process %d: %s; not restarting", process.pid, self.gave_up)
                if self.on_exit is not None:
                    self.on_exit(self.gave_up)
                return
            reason = {
                core.EXIT_DEVICE_FAILED: "the device failed",
                core.EXIT_STALLED: "it stalled",
                core.EXIT_LOAD_FAILED: "the model could not be loaded again",
            }.get(code, f"it exited with code {code}")
            if time.monotonic() - started > HEALTHY_AFTER_S:
                backoff = FIRST_BACKOFF_S
            log.error("engine process %d stopped (%s); restarting in %.0f s", process.pid, reason, backoff)
            if self.on_exit is not None:
                self.on_exit(f"the engine process stopped ({reason}); it is being restarted")
            if self._stopping.wait(backoff):
                return
            backoff = min(MAX_BACKOFF_S, 2 * backoff)
            self.restarts += 1
            self._spawn()

