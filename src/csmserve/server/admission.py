"""Who gets in: stream slots, the waiting room of sockets without a key yet, and the drain.

One :class:`Admission` per app, used by every route on the event loop (no locks: plain counters
changed between awaits).
"""

from __future__ import annotations

from collections.abc import Callable

from csmserve.errors import Overloaded
from csmserve.metrics import Metrics

WAITING_ROOM_FULL = "too many connections are waiting to authenticate"
SHUTTING_DOWN = "the server is shutting down; reconnect to another instance"


class Admission:
    """``max_streams`` requests stream at once; ``max_unauthenticated`` accepted WebSockets may wait
    for their key; once ``draining`` (SIGTERM, a replica stopping) nothing new is admitted.

    ``max_streams`` may be a callable: the default follows the engine's batch, known once it is loaded."""

    def __init__(self, metrics: Metrics, max_streams: int | Callable[[], int], max_unauthenticated: int):
        self.metrics = metrics
        self._max_streams = max_streams
        self.max_unauthenticated = max_unauthenticated
        #: Streams admitted and not yet left.
        self.active = 0
        #: WebSockets accepted without a key that have not yet sent one.
        self.unauthenticated = 0
        #: Set on SIGTERM: /ready is 503, new requests are refused, in-flight ones finish.
        self.draining = False

    @property
    def max_streams(self) -> int:
        return self._max_streams() if callable(self._max_streams) else self._max_streams

    def enter(self, endpoint: str) -> None:
        """Admit one streaming request, or count it as rejected and raise :class:`Overloaded`
        (WebSocket 1013, HTTP 429). Every admitted request calls :meth:`leave` once."""
        limit = self.max_streams
        if self.draining or self.active >= limit:
            self.metrics.finished(endpoint, "rejected")
            if self.draining:
                raise Overloaded(SHUTTING_DOWN)
            raise Overloaded(f"{limit} requests are streaming already; retry shortly")
        self.active += 1
        self.metrics.active_streams.set(self.active)

    def leave(self) -> None:
        self.active -= 1
        self.metrics.active_streams.set(self.active)

    def wait_for_key(self) -> bool:
        """Take a place among the sockets waiting for their key; False (refuse the socket with 1013)
        when ``max_unauthenticated`` already wait. The place is given back by :meth:`key_given`."""
        if self.unauthenticated >= self.max_unauthenticated:
            return False
        self.unauthenticated += 1
        return True

    def key_given(self) -> None:
        """A waiting socket showed its key, or ended: its place is free."""
        self.unauthenticated -= 1
