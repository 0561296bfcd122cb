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
    """``max_streams`` requests stream at once, at most ``max_per_tenant`` of them for one tenant (an
    API key, or a client address when keys are off: :func:`~csmserve.server.auth.tenant_of`);
    ``max_unauthenticated`` accepted WebSockets may wait for their key; once ``draining`` (SIGTERM, a
    replica stopping) nothing new is admitted.

    ``max_streams`` and ``max_per_tenant`` may be callables: the defaults follow the engine's batch,
    known once it is loaded (``max_per_tenant`` is then given ``max_streams``)."""

    def __init__(
        self, metrics: Metrics, max_streams: int | Callable[[], int], max_unauthenticated: int,
        max_per_tenant: int | Callable[[int], int] | None = None,
    ):
        self.metrics = metrics
        self._max_streams = max_streams
        self._max_per_tenant = max_per_tenant
        self.max_unauthenticated = max_unauthenticated
        #: Streams admitted and not yet left.
        self.active = 0
        #: Streams admitted and not yet left, per tenant (tenants with none are not kept).
        self.by_tenant: dict[str | None, int] = {}
        #: WebSockets accepted without a key that have not yet sent one.
        self.unauthenticated = 0
        #: Set on SIGTERM: /ready is 503, new requests are refused, in-flight ones finish.
        self.draining = False

    @property
    def max_streams(self) -> int:
        return self._max_streams() if callable(self._max_streams) else self._max_streams

    def max_per_tenant(self, max_streams: int | None = None) -> int:
        """Streams one tenant may have at once (all of ``max_streams`` when no quota was set)."""
        if max_streams is None:
            max_streams = self.max_streams
        quota = self._max_per_tenant
        if quota is None:
            return max_streams
        return quota(max_streams) if callable(quota) else quota

    def enter(self, endpoint: str, tenant: str | None = None) -> None:
        """Admit one streaming request for ``tenant``, or count it as rejected and raise
        :class:`Overloaded` (WebSocket 1013, HTTP 429). Every admitted request calls :meth:`leave`
        once, with the same tenant."""
        limit = self.max_streams
        quota = self.max_per_tenant(limit)
        mine = self.by_tenant.get(tenant, 0)
        if self.draining or self.active >= limit or mine >= quota:
            self.metrics.finished(endpoint, "rejected")
            if self.draining:
                raise Overloaded(SHUTTING_DOWN)
            if self.active >= limit:
                raise Overloaded(f"{limit} requests are streaming already; retry shortly")
            raise Overloaded(
                f"{quota} requests of this API key (or client) are streaming already, its share of the server; "
                "retry when one has ended"
            )
        self.active += 1
        self.by_tenant[tenant] = mine + 1
        self.metrics.active_streams.set(self.active)

    def leave(self, tenant: str | None = None) -> None:
        self.active -= 1
        left = self.by_tenant.get(tenant, 0) - 1
        if left > 0:
            self.by_tenant[tenant] = left
        else:
            self.by_tenant.pop(tenant, None)
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
