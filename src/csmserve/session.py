"""Per-connection logic of ``/ws/generate``, without sockets: messages in, jobs and events out.

A connection carries requests one after another, in order. While one streams, the client may send
more (they queue, up to a bound) or cancel one (the current one, or a queued one before it starts).
The WebSocket adapter feeds every text/binary frame to :meth:`Session.handle` and sends back what it
returns; it asks :meth:`Session.next_job` what to stream next.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from csmserve.errors import CsmServeError, InvalidRequest
from csmserve.protocol import (
    CancelMessage,
    GenerateRequest,
    Limits,
    done_event,
    error_event,
    parse_client_message,
    request_id_of,
)


@dataclass
class Job:
    """One accepted request on this connection."""

    request: GenerateRequest
    received_at: float
    cancelled: bool = False


@dataclass
class Outcome:
    """What :meth:`Session.handle` asks the adapter to do: send ``events``; stop the current job?"""

    events: list[dict] = field(default_factory=list)
    cancel_current: bool = False


class Session:
    def __init__(self, limits: Limits, max_pending: int = 8):
        self.limits = limits
        self.max_pending = max_pending
        self.pending: deque[Job] = deque()
        self.current: Job | None = None

    def handle(self, raw: str | bytes | None, now: float) -> Outcome:
        """Process one client frame. Never raises: a bad frame becomes an error event."""
        try:
            message = parse_client_message(raw, self.limits)
        except InvalidRequest as exc:
            return Outcome([error_event(exc.code, exc.message, request_id_of(raw))])
        if isinstance(message, CancelMessage):
            return self._cancel(message.request_id)
        return self._enqueue(message, now)

    def _enqueue(self, request: GenerateRequest, now: float) -> Outcome:
        if len(self.pending) >= self.max_pending:
            return Outcome(
                [
                    error_event(
                        "too_many_pending",
                        f"{self.max_pending} requests are already queued on this connection; "
                        "wait for one to finish or cancel one",
                        request.request_id,
                    )
                ]
            )
        self.pending.append(Job(request, now))
        return Outcome()

    def _cancel(self, request_id: str | None) -> Outcome:
        current = self.current
        if current is not None and not current.cancelled and request_id in (None, current.request.request_id):
            current.cancelled = True
            return Outcome(cancel_current=True)
        for job in self.pending:
            if request_id is not None and job.request.request_id == request_id:
                self.pending.remove(job)
                return Outcome([done_event(request_id, cancelled=True, audio_ms=0)])
        # Nothing to cancel (it may have just finished): barge-in races are normal, so no error.
        return Outcome()

    def next_job(self) -> Job | None:
        """The next request to stream, which becomes :attr:`current`."""
        self.current = self.pending.popleft() if self.pending else None
        return self.current

    def finish(self) -> None:
        self.current = None


def failure_event(error: CsmServeError, request_id: str | None) -> dict:
    return error_event(error.code, error.message, request_id)
