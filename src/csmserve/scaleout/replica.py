"""What a replica adds around the single server's app: its name on what it sends, its own metrics
listener, start-up that waits for the model, and a drain that closes idle WebSockets.

The app itself (:func:`~csmserve.app.create_app`) is unchanged, so every route and rule of
the single server holds on a replica. These are ASGI middlewares and lifespan wrappers, so they also
know nothing of Ray: :mod:`csmserve.ray_app` puts them together.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable

from csmserve.config import OFFLINE_MODEL

log = logging.getLogger(__name__)

#: Close code for a connection ended by a drain: "try again later" (reconnect: another replica answers).
TRY_AGAIN_LATER = 1013
#: Ports tried from the first metrics port upwards, one per replica on a node.
METRICS_PORTS_PER_NODE = 64


class ReplicaStamp:
    """ASGI middleware: the replica's name in every ``done`` frame (``"replica"``) and in an
    ``x-csm-replica`` header on HTTP responses and WebSocket handshakes."""

    def __init__(self, app, replica: str):
        self.app = app
        self.replica = replica
        self.header = (b"x-csm-replica", replica.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)

        async def stamped(message) -> None:
            kind = message["type"]
            if kind in ("http.response.start", "websocket.accept"):
                message = {**message, "headers": [*message.get("headers", ()), self.header]}
            elif kind == "websocket.send":
                text = message.get("text")
                # Every frame that ends a request is built by the seed API's done_event / error_event.
                if text is not None and text.startswith('{"done"'):
                    event = json.loads(text)
                    event["replica"] = self.replica
                    message = {**message, "text": json.dumps(event)}
            await send(message)

        await self.app(scope, receive, stamped)


class OpenSockets:
    """The replica's open WebSockets, so that a drain can close them once their streams are done."""

    def __init__(self) -> None:
        self._closers: set[Callable[[int, str], Awaitable[None]]] = set()

    def __len__(self) -> int:
        return len(self._closers)

    async def close_all(self, code: int = TRY_AGAIN_LATER, reason: str = "draining") -> int:
        """Close every open WebSocket with ``code``; returns how many."""
        closers = list(self._closers)
        for close in closers:
            with contextlib.suppress(Exception):
                await close(code, reason)
        return len(closers)


class TrackSockets:
    """ASGI middleware: registers each WebSocket in ``sockets``. Closing one sends the close frame to
    the client and a disconnect to the app, which then ends the connection as if the client left."""

    def __init__(self, app, sockets: OpenSockets):
        self.app = app
        self.sockets = sockets

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "websocket":
            return await self.app(scope, receive, send)
        closing = asyncio.Event()
        status = {"open": False}

        async def tracked_send(message) -> None:
            if message["type"] == "websocket.accept":
                status["open"] = True
            elif message["type"] == "websocket.close":
                if not status["open"]:
                    return  # closed by a drain already
                status["open"] = False
            await send(message)

        async def tracked_receive():
            if closing.is_set():
                return {"type": "websocket.disconnect", "code": TRY_AGAIN_LATER}
            received = asyncio.ensure_future(receive())
            closed = asyncio.ensure_future(closing.wait())
            await asyncio.wait({received, closed}, return_when=asyncio.FIRST_COMPLETED)
            closed.cancel()
            if received.done():
                return received.result()
            received.cancel()
            return {"type": "websocket.disconnect", "code": TRY_AGAIN_LATER}

        async def close(code: int, reason: str) -> None:
            if status["open"]:
                status["open"] = False
                await send({"type": "websocket.close", "code": code, "reason": reason})
            closing.set()

        self.sockets._closers.add(close)
        try:
            await self.app(scope, tracked_receive, tracked_send)
        finally:
            self.sockets._closers.discard(close)


async def drain_when(stopping: Callable[[], bool], state, sockets: OpenSockets, poll_s: float = 0.25) -> None:
    """Once ``stopping()`` turns true, drain as the single server does on SIGTERM: refuse new
    requests (``state.admission.draining``), let in-flight streams finish for up to ``drain_timeout_s``, then
    close every WebSocket with 1013, so that clients reconnect (to another replica)."""
    while not stopping():
        await asyncio.sleep(poll_s)
    state.admission.draining = True
    log.warning("draining: %d stream(s) in flight, up to %.0f s", state.admission.active, state.settings.drain_timeout_s)
    deadline = time.monotonic() + state.settings.drain_timeout_s
    while state.admission.active > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    closed = await sockets.close_all()
    log.warning("drained (%d stream(s) left); closed %d WebSocket(s)", state.admission.active, closed)


def replica_lifespan(lifespan, state, stopping: Callable[[], bool], sockets: OpenSockets):
    """Wrap the app's lifespan: start-up returns only once the model is loaded (a replica that is
    still loading gets no traffic; one whose model fails fails to start), and the drain watches
    ``stopping`` while the replica runs."""

    @contextlib.asynccontextmanager
    async def wrapped(app):
        async with lifespan(app) as value:
            while not state.engine.info.ready:
                if state.load_error is not None or state.engine.info.failed:
                    message = state.load_error.message if state.load_error else state.engine.info.failed
                    raise RuntimeError(f"model load failed: {message}")
                await asyncio.sleep(0.05)
            drain = asyncio.create_task(drain_when(stopping, state, sockets))
            try:
                yield value
            finally:
                drain.cancel()
                with contextlib.suppress(BaseException):
                    await drain

    return wrapped


def health_problem(state) -> str | None:
    """Why a replica must not serve (Ray's health check fails, Ray replaces it), or None if it may:
    a failed model or engine (a GPU error, the watchdog), a load failure, a drain, not loaded yet."""
    if state.ready:
        return None
    failure = state.engine.info.failed or (state.load_error.message if state.load_error is not None else None)
    return failure or ("draining" if state.admission.draining else "the model is not loaded")


def prepare_offline_model(settings) -> None:
    """Write the offline model once when several replicas on one machine would each write it.

    With ``--model offline``, or no model configured and none available, every replica loads the
    offline model from ``offline_model_dir``; two writing it at once could let one load the other's half-written files.
    Under a file lock, the first writes it and the others find it there."""
    if settings.engine != "csm" or settings.model not in (None, OFFLINE_MODEL):
        return
    import fcntl

    from csmserve.engine.csm import ensure_offline_model
    from csmserve.engine.loading import default_model_available

    directory = settings.offline_model_dir
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f".{directory.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if settings.model == OFFLINE_MODEL or not default_model_available():
            ensure_offline_model(directory)


class ReplicaLogFilter(logging.Filter):
    """Names the replica at the start of every log message (text and JSON logs alike)."""

    def __init__(self, replica: str):
        super().__init__()
        self.prefix = f"[replica {replica}] "

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(self.prefix):
            record.msg, record.args = self.prefix + message, ()
        return True


def labelled_registry(registry, **labels: str):
    """A registry that exports every sample of ``registry`` with ``labels`` added, at scrape time."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector

    class Labelled(Collector):
        def collect(self):
            for family in registry.collect():
                copy = Metric(family.name, family.documentation, family.type, family.unit)
                for sample in family.samples:
                    copy.add_sample(
                        sample.name, {**sample.labels, **labels}, sample.value, sample.timestamp, sample.exemplar
                    )
                yield copy

    out = CollectorRegistry(auto_describe=False)
    out.register(Labelled())
    return out


def serve_metrics(registry, host: str, first_port: int) -> int | None:
    """Serve ``registry`` (Prometheus text, any path) on the first free port from ``first_port``:
    that port, or None when none of the next ``METRICS_PORTS_PER_NODE`` is free."""
    from prometheus_client import start_http_server

    for port in range(first_port, first_port + METRICS_PORTS_PER_NODE):
        try:
            start_http_server(port, addr=host, registry=registry)
        except OSError:
            continue
        return port
    log.warning("no free metrics port from %d: this replica's metrics are only on /metrics", first_port)
    return None
