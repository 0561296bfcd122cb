"""Health that tells the truth: is the engine making progress on the work it holds?

The engine's :class:`~csmserve.engine.Capacity` carries ``steps``, a monotonic progress counter.
While requests wait or generate, ``steps`` must move; when it has not moved for ``stall_timeout_s``
the engine is stuck (a wedged device, a deadlock, a consumer that never lets go): ``/ready`` fails,
so a load balancer stops sending work, and ``/health`` says why; an engine process that sees it of
itself exits, to be restarted. Idle engines never stall.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Watchdog:
    """Watches ``capacity()`` (an engine's :meth:`capacity`); plain state, sampled by :meth:`run`
    and on every :meth:`stalled` call."""

    def __init__(
        self,
        capacity: Callable,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
        armed: Callable[[], bool] = lambda: True,
    ):
        """``armed``: whether to watch at all (the app arms it once the engine is ready: capturing or
        compiling the steps at start-up is not a stall)."""
        self.capacity = capacity
        self.armed = armed
        self.timeout_s = timeout_s
        self.clock = clock
        self._steps: int | None = None
        self._since: float | None = None  # when work was first seen without progress
        self._reported = False

    def observe(self) -> None:
        snapshot = self.capacity()
        now = self.clock()
        if not self.armed() or (snapshot.active == 0 and snapshot.waiting == 0):
            self._steps, self._since = snapshot.steps, None
        elif self._since is None or snapshot.steps != self._steps:
            self._steps, self._since = snapshot.steps, now
        reason = self._reason(now, snapshot)
        if reason and not self._reported:
            log.error("engine stalled: %s", reason)
        elif not reason and self._reported:
            log.warning("engine progressing again")
        self._reported = reason is not None

    def _reason(self, now: float, snapshot) -> str | None:
        if self._since is None or now - self._since < self.timeout_s:
            return None
        return (
            f"the engine made no progress for {now - self._since:.0f} s with {snapshot.active} request(s) "
            f"generating and {snapshot.waiting} waiting (stall_timeout_s={self.timeout_s:g})"
        )

    def stalled(self) -> str | None:
        """Why the engine counts as stuck now, or None."""
        self.observe()
        return self._reason(self.clock(), self.capacity())

    async def run(self) -> None:
        """Sample a few times per timeout, so a stall is seen even when nobody asks."""
        interval = min(1.0, self.timeout_s / 4)
        while True:
            await asyncio.sleep(interval)
            try:
                self.observe()
            except Exception:  # noqa: BLE001 - the watchdog must outlive an engine hiccup
                log.exception("watchdog could not read the engine's capacity")
