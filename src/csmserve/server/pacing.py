"""Pacing by what the client has played: a stream runs at most ``max_lead_s`` of audio ahead of
what its client has taken off the socket.

The kernel's socket buffers hold megabytes (a minute of 24 kHz PCM, a whole 90 s request in mu-law),
so a send that completes says nothing about the client: a client that reads nothing would have its
whole request generated, at full speed, for nobody. What counts is what reached the client, measured
by the connection's :class:`Delivery` (bytes written, minus those its TCP has not yet acknowledged).

Every audio item a stream sends is marked with (the connection's bytes written after it, the stream's
audio position after it, in seconds). The client has taken a stream up to the last mark whose bytes
it acknowledged; the stream's *lead* is its newest mark's position minus that. Before each audio item
the sender waits (:meth:`Pacer.wait`) while the lead is over ``max_lead_s``; a wait that lasts
``max_lag_s`` (the client took less than one item in that time) is :class:`ClientTooSlow`. While the
sender waits it takes nothing from the engine, whose credit makes the stream sit out its steps: its
row yields to the others. A client that reads as fast as audio comes never waits.

What the server cannot see: bytes the client's kernel acknowledged and its application has not read
(its receive buffer: 64-200 KiB unless it read fast enough to grow it) count as taken. Without a
delivery (the app behind another server, such as Ray Serve's proxy), nothing is paced and only the
send deadline applies.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Mapping
from typing import Any, Protocol

from csmserve.errors import ClientTooSlow
from csmserve.speech import StreamStats

#: The ASGI scope extension that carries a connection's :class:`Delivery` (set by ``serving.py``).
DELIVERY = "csmserve.delivery"
#: How often a waiting sender looks at the connection again.
POLL_S = 0.02


class Delivery(Protocol):
    """One connection's output: ``written`` bytes so far, of which :meth:`unacknowledged` have not yet
    reached the client."""

    written: int

    def unacknowledged(self) -> int: ...


def delivery_of(scope: Mapping[str, Any]) -> Delivery | None:
    """The connection's delivery, when the server that runs the app measures one."""
    return (scope.get("extensions") or {}).get(DELIVERY)


class _Lane:
    """One stream's marks on a connection; holds its figures so that their id stays theirs."""

    def __init__(self, stats: StreamStats):
        self.stats = stats
        self.marks: deque[tuple[int, float]] = deque()  # (bytes written after an item, position after it)
        self.taken_s = position_s(stats)

    def lead_s(self, delivered: int) -> float:
        while self.marks and self.marks[0][0] <= delivered:
            self.taken_s = self.marks.popleft()[1]
        return self.marks[-1][1] - self.taken_s if self.marks else 0.0


def position_s(stats: StreamStats) -> float:
    """How much audio the stream has produced so far, in seconds."""
    return stats.samples / stats.sample_rate


class Pacer:
    """The lead rule (module doc) for one connection; its streams are told apart by their
    :class:`StreamStats`. Used on the event loop only."""

    def __init__(self, delivery: Delivery | None, max_lead_s: float, max_lag_s: float):
        self.delivery = delivery
        self.max_lead_s = max_lead_s
        self.max_lag_s = max_lag_s
        self._lanes: dict[int, _Lane] = {}

    def _delivered(self) -> int:
        return self.delivery.written - self.delivery.unacknowledged()

    def lead_s(self, stats: StreamStats) -> float:
        """Seconds of the stream's audio sent and not yet taken by the client."""
        lane = self._lanes.get(id(stats))
        return 0.0 if lane is None or self.delivery is None else lane.lead_s(self._delivered())

    async def wait(self, stats: StreamStats) -> None:
        """Before sending more of the stream ``stats`` counts: return once its lead is at most
        ``max_lead_s``. Raises :class:`ClientTooSlow` after ``max_lag_s`` of waiting. Cancel-safe."""
        if self.delivery is None:
            return
        lane = self._lanes.get(id(stats))
        if lane is None:
            lane = self._lanes[id(stats)] = _Lane(stats)
        started = time.monotonic()
        while lane.lead_s(self._delivered()) > self.max_lead_s:
            if time.monotonic() - started >= self.max_lag_s:
                raise ClientTooSlow(f"the client took no audio for {self.max_lag_s:g} s")
            await asyncio.sleep(POLL_S)
        self._forget_taken(but=lane)

    def sent(self, stats: StreamStats) -> None:
        """An item of the stream ``stats`` counts was just written (after :meth:`wait`, which opened the
        stream's lane where its audio stood before the item): mark where it ends."""
        if self.delivery is None:
            return
        lane = self._lanes.get(id(stats))
        if lane is None:
            lane = self._lanes[id(stats)] = _Lane(stats)
        lane.marks.append((self.delivery.written, position_s(stats)))

    def _forget_taken(self, but: _Lane) -> None:
        """Drop the lanes of other streams whose audio the client has taken in full (finished ones)."""
        delivered = self._delivered()
        for key, lane in list(self._lanes.items()):
            if lane is not but and lane.lead_s(delivered) == 0.0 and not lane.marks:
                del self._lanes[key]
