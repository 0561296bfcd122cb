"""The requests waiting for a row of the batch: one line per tenant, taken in turn.

A tenant is whoever a request acts for (``SynthesisRequest.tenant``: an API key's id, or a client
address when keys are off). When rows are scarce, the next free row goes to the tenant with the fewest
rows in the batch, and among those to the one served least recently (round-robin; a tenant never
served, or not for the last :data:`REMEMBERED` tenants served, first), never simply to the request
that came first: a tenant that queues many requests waits behind the others' next one.

Only live requests count. A request whose consumer went away (``cancelled``) is invisible from that
moment: it no longer counts toward the bound (``maxsize``) or in :meth:`Intake.qsize`, is never taken,
and is dropped by the next :meth:`Intake.purge` (the worker purges whenever it wakes, and a cancel
wakes it).

Thread-safe: the event loop puts, the worker thread takes; both under one lock, no I/O under it.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from typing import Any

#: Tenants whose last turn is remembered (the least recent are forgotten: a bound on memory).
REMEMBERED = 4096
#: A waiting stream: the worker's ``Stream`` (``request.tenant`` and a ``cancelled`` event are read).
Waiting = Any


def tenant_of(stream: Waiting) -> Hashable:
    return stream.request.tenant


class Intake:
    """At most ``maxsize`` live streams waiting, in one line per tenant. Queue-like (``put_nowait``
    raises :class:`queue.Full`, ``get_nowait`` :class:`queue.Empty`), so the worker keeps its shape."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._lock = threading.Lock()
        #: Each tenant's line, in the order the lines were opened.
        self._lines: dict[Hashable, deque[Waiting]] = {}
        #: When each tenant was last given a row (a running count), least recent first.
        self._served: OrderedDict[Hashable, int] = OrderedDict()
        self._turns = 0

    def qsize(self) -> int:
        """Live streams waiting (cancelled ones no longer count)."""
        with self._lock:
            return self._live()

    def put_nowait(self, stream: Waiting) -> None:
        """Queue ``stream`` at the end of its tenant's line; :class:`queue.Full` when ``maxsize`` live
        streams wait already."""
        with self._lock:
            if self._live() >= self.maxsize:
                self._purge()
                if self._live() >= self.maxsize:
                    raise queue.Full
            self._lines.setdefault(tenant_of(stream), deque()).append(stream)

    def get_nowait(self, rows: Callable[[Hashable], int] = lambda tenant: 0) -> Waiting:
        """The next live stream: the first of the line whose tenant has the fewest ``rows(tenant)``
        in the batch, ties to the tenant served least recently. :class:`queue.Empty` when none waits."""
        with self._lock:
            self._purge()
            if not self._lines:
                raise queue.Empty
            tenant = min(self._lines, key=lambda t: (rows(t), self._served.get(t, -1)))
            line = self._lines[tenant]
            stream = line.popleft()
            if not line:
                del self._lines[tenant]
            self._turns += 1
            self._served[tenant] = self._turns
            self._served.move_to_end(tenant)
            while len(self._served) > REMEMBERED:
                self._served.popitem(last=False)
            return stream

    def purge(self) -> int:
        """Drop the cancelled streams now; how many there were."""
        with self._lock:
            return self._purge()

    def _live(self) -> int:
        return sum(1 for line in self._lines.values() for stream in line if not stream.cancelled.is_set())

    def _purge(self) -> int:
        dropped = 0
        for tenant in list(self._lines):
            line = self._lines[tenant]
            live = deque(stream for stream in line if not stream.cancelled.is_set())
            dropped += len(line) - len(live)
            if live:
                self._lines[tenant] = live
            else:
                del self._lines[tenant]
        return dropped
