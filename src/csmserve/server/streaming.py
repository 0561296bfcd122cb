"""The rule every HTTP route that generates audio shares: a client can only spend its own share.

* Admission: a request takes a stream slot (:meth:`Admission.enter`) and its first audio piece is
  awaited *before* the response starts, so a full server or worker queue is a 429 with
  ``Retry-After`` (never a 200 with an empty body).
* Deadline: one deadline per request (``request_timeout_s``), enforced inside the one task that
  iterates the engine, so it cancels generation cleanly (no cancel scope crosses a ``yield``).
* Slow clients: audio is paced by what the client has taken (:mod:`csmserve.server.pacing`: at most
  ``max_lead_s`` ahead), and a client that takes nothing for ``max_lag_s`` (or whose send does not
  complete in that time) is cut and its generation cancelled, as on the WebSocket. Whole files
  (:func:`collected`) are not paced.
* Disconnects: a client that goes away cancels its generation; the request counts as ``disconnected``.

A route builds an async iterator of response bytes over the speech layer and hands it to
:func:`guarded_stream` (streamed), or collects a whole file with :func:`collected`. New routes inherit
the rule by calling one of them, with their API's error renderer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from csmserve.errors import ClientTooSlow, CsmServeError, DeadlineExceeded, Overloaded
from csmserve.server.deadline import deadline_exceeded
from csmserve.server.pacing import Pacer, delivery_of
from csmserve.server.state import ServerState
from csmserve.speech import StreamStats

log = logging.getLogger(__name__)
T = TypeVar("T")
#: An API's error renderer: the error as a response in that API's shape.
Render = Callable[[CsmServeError], Response]

#: Outcome of a request, as counted in ``csm_requests_total``.
OUTCOME_OF = {Overloaded: "rejected", DeadlineExceeded: "timeout"}


def outcome_of(exc: CsmServeError) -> str:
    return OUTCOME_OF.get(type(exc), "error")


class ClientGone(Exception):
    """The client disconnected, or read too slowly and was cut."""


class Slot:
    """One admitted request of ``tenant``: its stream slot, deadline and outcome. Leave it exactly once."""

    def __init__(self, state: ServerState, endpoint: str, tenant: str | None = None):
        state.admission.enter(endpoint, tenant)  # raises Overloaded (429) when full, over quota or draining
        self.state, self.endpoint, self.tenant = state, endpoint, tenant
        self.deadline = time.monotonic() + state.settings.request_timeout_s
        self._left = False

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def timeout_error(self) -> DeadlineExceeded:
        return deadline_exceeded(self.state.settings.request_timeout_s)

    def leave(self, outcome: str, stats: StreamStats | None = None) -> None:
        if not self._left:
            self._left = True
            self.state.admission.leave(self.tenant)
            self.state.metrics.finished(self.endpoint, outcome, stats)


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, slot: Slot, work: Callable[[], Awaitable[T]]) -> T:
    """Run ``work()`` (which iterates the engine) under the slot's deadline, cancelling it when the
    client disconnects. Raises :class:`ClientGone` or :class:`DeadlineExceeded`; call only after the
    request body has been read."""
    result: list[T] = []
    error: CsmServeError | None = None
    gone = False
    with anyio.move_on_after(slot.remaining()) as deadline:
        async with anyio.create_task_group() as group:

            async def watch() -> None:
                nonlocal gone
                await _wait_for_disconnect(request.receive)
                gone = True
                group.cancel_scope.cancel()

            group.start_soon(watch)
            try:
                result.append(await work())
            except CsmServeError as exc:  # raised below, not wrapped in an exception group
                error = exc
            group.cancel_scope.cancel()
    if error is not None:
        raise error
    if gone:
        raise ClientGone("the client disconnected")
    if deadline.cancelled_caught or not result:
        raise slot.timeout_error()
    return result[0]


async def collected(
    request: Request, state: ServerState, endpoint: str, work: Callable[[], Awaitable[None]], render: Render,
    stats: StreamStats | None = None, tenant: str | None = None,
) -> Response | None:
    """Admit the request (for ``tenant``) and run ``work()`` (which collects a whole file from the engine) under
    :func:`until_disconnect`, leaving the slot with its outcome. None when it completed, else the
    response to send instead: ``render(error)`` (a refusal, a failure, the deadline), or a 499 when
    the client went away (nobody reads it; the generation was cancelled)."""
    try:
        slot = Slot(state, endpoint, tenant)
    except Overloaded as exc:
        return render(exc)
    try:
        await until_disconnect(request, slot, work)
    except ClientGone:
        slot.leave("disconnected", stats)
        return Response(status_code=499)
    except CsmServeError as exc:
        slot.leave(outcome_of(exc), stats)
        return render(exc)
    except BaseException:
        slot.leave("error", stats)
        raise
    slot.leave("ok", stats)
    return None


async def first_piece(slot: Slot, chunks: AsyncIterator[bytes]) -> bytes | None:
    """Wait for the stream's first bytes before any header is sent, so that a refusal by the engine
    (a full queue: :class:`Overloaded`) or a failure is still an HTTP status. None: nothing at all."""
    with anyio.move_on_after(slot.remaining()) as deadline:
        async for piece in chunks:
            if piece:
                return piece
        return None
    if deadline.cancelled_caught:
        raise slot.timeout_error()
    return None


class GuardedStream(Response):
    """Streams ``chunks`` (response bytes) to one HTTP client under the shared rule (module doc).

    ``first`` is what :func:`first_piece` returned. ``stats`` (the stream's figures) pace it by what
    the client has taken (:mod:`csmserve.server.pacing`); without them only the send deadline holds.
    The slot is left, and the outcome counted, when the stream ends in any way; ``chunks`` is closed,
    which cancels generation in the engine."""

    def __init__(
        self, slot: Slot, chunks: AsyncIterator[bytes], first: bytes | None, media_type: str, stats: StreamStats | None = None
    ):
        self.slot, self.chunks, self.first, self.stats = slot, chunks, first, stats
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.init_headers(None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        outcome = "error"
        settings = self.slot.state.settings
        lag = settings.max_lag_s
        pacer = Pacer(delivery_of(scope) if self.stats is not None else None, settings.max_lead_s, lag)

        def cut() -> ClientGone:
            nonlocal outcome
            self.slot.state.metrics.slow_clients.inc()
            outcome = "disconnected"
            log.warning("cut a client that read nothing for %g s", lag)
            return ClientGone("client reads too slowly")

        try:
            with anyio.move_on_after(self.slot.remaining()) as deadline:
                async with anyio.create_task_group() as group:

                    async def watch() -> None:
                        nonlocal outcome
                        await _wait_for_disconnect(receive)
                        outcome = "disconnected"
                        group.cancel_scope.cancel()

                    async def bounded_send(message: dict) -> None:
                        audio = message["type"] == "http.response.body" and message["body"]
                        if audio:
                            try:
                                await pacer.wait(self.stats)
                            except ClientTooSlow:
                                raise cut() from None
                        with anyio.move_on_after(lag) as slow:
                            await send(message)
                        if slow.cancelled_caught:
                            raise cut()
                        if audio:
                            pacer.sent(self.stats)

                    group.start_soon(watch)
                    # Caught here, in the task that raised them, so no exception group forms (Python 3.10).
                    try:
                        outcome = await self._stream(bounded_send)
                    except ClientGone:
                        pass  # the outcome is already "disconnected"
                    except CsmServeError as failed:  # headers are out: end the stream, say why in the log
                        outcome = outcome_of(failed)
                        log.warning("stream failed: %s", failed.message)
                    group.cancel_scope.cancel()
            if deadline.cancelled_caught:
                outcome = "timeout"
                log.warning("%s", self.slot.timeout_error().message)
        finally:
            await self.chunks.aclose()
            self.slot.leave(outcome, self.stats)

    async def _stream(self, send: Callable[[dict], Awaitable[None]]) -> str:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        if self.first:
            await send({"type": "http.response.body", "body": self.first, "more_body": True})
        async for piece in self.chunks:
            if piece:
                await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return "ok"


async def guarded_stream(
    state: ServerState, endpoint: str, chunks: AsyncIterator[bytes], media_type: str, render: Render,
    stats: StreamStats | None = None, tenant: str | None = None,
) -> Response:
    """Admit the request (for ``tenant``) and start its stream: the response to return, which is
    ``render(error)`` when it was refused or failed before its first audio (nothing sent yet; the slot
    is already left)."""
    try:
        slot = Slot(state, endpoint, tenant)
    except Overloaded as exc:
        await chunks.aclose()
        return render(exc)
    try:
        first = await first_piece(slot, chunks)
    except CsmServeError as exc:
        await chunks.aclose()
        slot.leave(outcome_of(exc), stats)
        return render(exc)
    except BaseException:
        await chunks.aclose()
        slot.leave("error", stats)
        raise
    return GuardedStream(slot, chunks, first, media_type, stats)
