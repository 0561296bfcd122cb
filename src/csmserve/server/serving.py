"""uvicorn, configured once for the CLI and the tests: connection caps, deadlines, delivery.

* ``max_connections`` (uvicorn's ``limit_concurrency``): beyond it, new requests get a 503, except
  ``/health`` and ``/ready``, which may use ``probe_connections`` more (an orchestrator's probe
  still gets its answer while clients fill the server).
* ``header_timeout_s``: a connection must deliver a request's headers within this long after it
  opens (or after its previous response), or it is closed; uvicorn alone waits for ever. (Bodies
  have their own deadline, in :mod:`csmserve.server.guard`.)
* ``max_lag_s`` again when a connection closes: output the client has not read by then is dropped
  and the socket aborted (a non-reader that was cut does not keep its socket and slot).
* Delivery: every connection's transport counts the bytes written to it and, on Linux, asks the
  kernel how many of them the client has not yet acknowledged; HTTP and WebSocket scopes carry it
  as ``scope["extensions"]["csmserve.delivery"]`` for :mod:`csmserve.server.pacing`.
* keep-alive idle connections are closed after 5 s (uvicorn's default, stated here).
"""

from __future__ import annotations

import asyncio
import fcntl
import struct
import termios

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from csmserve.config import Settings
from csmserve.server.pacing import DELIVERY

#: Paths that may use the connections reserved for probes beyond ``max_connections``.
PROBE_PATHS = (b"/health", b"/ready")
#: Linux's SIOCOUTQ (the same number as TIOCOUTQ): a TCP socket's bytes not yet acknowledged by the peer.
_OUTQ = getattr(termios, "TIOCOUTQ", None)


class ConnectionTransport:
    """A connection's transport, with two additions; everything else is the wrapped transport's.

    * Delivery (:class:`csmserve.server.pacing.Delivery`): ``written`` counts the bytes handed to it,
      :meth:`unacknowledged` those the client's TCP has not yet acknowledged (asyncio's buffer plus the
      kernel's send queue), so ``written - unacknowledged()`` is what reached the client.
    * A bounded close: asyncio's ``close()`` waits for ever for a peer that never reads, so a client
      cut for reading too slowly would keep its socket, its buffered audio and a connection slot;
      here buffered output gets ``linger_s`` to drain, then the socket is aborted.
    """

    def __init__(self, transport: asyncio.Transport, linger_s: float):
        self._transport = transport
        self._linger_s = linger_s
        self.written = 0
        self._socket = transport.get_extra_info("socket") if _OUTQ is not None else None

    def write(self, data) -> None:
        self.written += len(data)
        self._transport.write(data)

    def writelines(self, lines) -> None:
        for data in lines:
            self.write(data)

    def unacknowledged(self) -> int:
        """Bytes written and not yet acknowledged by the client: asyncio's buffer, plus (Linux) the
        kernel's send queue. Elsewhere only asyncio's buffer is seen."""
        pending = self._transport.get_write_buffer_size()
        fd = self._socket.fileno() if self._socket is not None else -1  # -1 once closed (never a reused number)
        if fd >= 0:
            try:
                pending += struct.unpack("i", fcntl.ioctl(fd, _OUTQ, b"\0\0\0\0"))[0]
            except OSError:  # not a TCP socket (a Unix socket, another platform)
                self._socket = None
        return pending

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
    time (slowloris: headers sent one byte a minute hold a connection for ever otherwise), aborting
    one whose closing output is not read within ``linger_s``, measuring delivery
    (:class:`ConnectionTransport`), and letting probes past the connection cap by ``probe_connections``."""

    header_timeout_s = 10.0
    linger_s = 10.0
    probe_connections = 8

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(ConnectionTransport(transport, self.linger_s))  # type: ignore[arg-type]
        self._cap = self.limit_concurrency
        self._arm_header_deadline()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {DELIVERY: self.transport}

    def _arm_header_deadline(self) -> None:
        self._awaiting_headers = True
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_deadline)

    def _header_deadline(self) -> None:
        if self._awaiting_headers and not self.transport.is_closing():
            self.transport.abort()

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        self._header_timer.cancel()
        if self._cap is not None:  # read by uvicorn's check below: probes have their own reserve
            probe = self.url.split(b"?", 1)[0] in PROBE_PATHS
            self.limit_concurrency = self._cap + (self.probe_connections if probe else 0)
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._header_timer.cancel()
        super().connection_lost(exc)


class MeteredWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol, its scope carrying the connection's delivery (the transport it
    inherits from the HTTP protocol that upgraded)."""

    def handle_connect(self, event) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)  # absent when the handshake was refused
        if scope is not None and isinstance(self.transport, ConnectionTransport):
            scope["extensions"][DELIVERY] = self.transport


def uvicorn_config(app, settings: Settings, **overrides) -> uvicorn.Config:
    """The uvicorn configuration ``csmserve serve`` runs with; tests override host/port/logging."""
    limits = {
        "header_timeout_s": settings.header_timeout_s, "linger_s": settings.max_lag_s,
        "probe_connections": settings.probe_connections,
    }
    protocol = type("HeaderDeadline", (HeaderDeadlineProtocol,), limits)
    options = dict(
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # ours: text or JSON, request ids, secrets redacted
        http=protocol,
        ws=MeteredWebSocketProtocol,
        ws_per_message_deflate=False,  # audio does not compress; deflate only costs CPU and latency
        # Frames a little over the limit get a JSON error from the app; far larger ones a 1009 close.
        ws_max_size=max(1 << 20, 4 * settings.max_message_bytes),
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=10,
    )
    options.update(overrides)
    return uvicorn.Config(app, **options)
