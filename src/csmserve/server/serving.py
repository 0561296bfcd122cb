"""uvicorn, configured once for the CLI and the tests: connection caps and deadlines.

* ``max_connections`` (uvicorn's ``limit_concurrency``): beyond it, new requests get a 503.
* ``header_timeout_s``: a connection must deliver a request's headers within this long after it
  opens (or after its previous response), or it is closed; uvicorn alone waits for ever.
* ``max_lag_s`` again when a connection closes: output the client has not read by then is dropped
  and the socket aborted (a non-reader that was cut does not keep its socket and slot).
* keep-alive idle connections are closed after 5 s (uvicorn's default, stated here).
"""

from __future__ import annotations

import asyncio

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from csmserve.config import Settings


class LingerLimit:
    """A transport whose ``close()`` gives buffered output ``linger_s`` to drain, then aborts.

    asyncio's ``close()`` waits for ever for a peer that never reads: a client cut for reading too
    slowly would keep its socket, its buffered audio and a connection slot. Everything else is the
    wrapped transport's."""

    def __init__(self, transport: asyncio.Transport, linger_s: float):
        self._transport = transport
        self._linger_s = linger_s

    def close(self) -> None:
        transport = self._transport
        pending = transport.get_write_buffer_size() > 0
        transport.close()
        if pending:
            asyncio.get_running_loop().call_later(self._linger_s, transport.abort)

    def __getattr__(self, name):
        return getattr(self._transport, name)


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing a connection whose request headers do not arrive in
    time (slowloris: headers sent one byte a minute hold a connection for ever otherwise), and
    aborting one whose closing output is not read within ``linger_s`` (:class:`LingerLimit`)."""

    header_timeout_s = 10.0
    linger_s = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(LingerLimit(transport, self.linger_s))  # type: ignore[arg-type]
        self._arm_header_deadline()

    def _arm_header_deadline(self) -> None:
        self._awaiting_headers = True
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_deadline)

    def _header_deadline(self) -> None:
        if self._awaiting_headers and not self.transport.is_closing():
            self.transport.abort()

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        self._header_timer.cancel()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._header_timer.cancel()
        super().connection_lost(exc)


def uvicorn_config(app, settings: Settings, **overrides) -> uvicorn.Config:
    """The uvicorn configuration ``csmserve serve`` runs with; tests override host/port/logging."""
    limits = {"header_timeout_s": settings.header_timeout_s, "linger_s": settings.max_lag_s}
    protocol = type("HeaderDeadline", (HeaderDeadlineProtocol,), limits)
    options = dict(
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # ours: text or JSON, request ids, secrets redacted
        http=protocol,
        ws_per_message_deflate=False,  # audio does not compress; deflate only costs CPU and latency
        # Frames a little over the limit get a JSON error from the app; far larger ones a 1009 close.
        ws_max_size=max(1 << 20, 4 * settings.max_message_bytes),
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=10,
    )
    options.update(overrides)
    return uvicorn.Config(app, **options)
