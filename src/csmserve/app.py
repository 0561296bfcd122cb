"""The application factory: one engine, one audio store, every API's routes, and loading in the background.

The top of the layers: the only module that imports the API packages (``csmserve.api.<name>.routes``),
over the shared rule of :mod:`csmserve.server` and the speech layer (``[tool.importlinter]``).
With ``CSM_WYOMING_PORT`` set, the lifespan also runs the Wyoming port (Home Assistant) on the same
event loop and engine; :func:`serve_wyoming` runs it alone (``csmserve wyoming``). The server listens while the model loads (``/health`` says ``loading`` with 503) and reports
``healthy`` once the engine is ready. A load failure is logged with its actionable message and
handed to ``on_load_failed`` (the CLI uses it to exit non-zero).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from csmserve import __version__
from csmserve.api.elevenlabs import routes as elevenlabs
from csmserve.api.openai import routes as openai
from csmserve.api.seed import routes as seed
from csmserve.api.voices import routes as voices
from csmserve.api.wyoming.connection import DEFAULT_PORT as WYOMING_PORT
from csmserve.api.wyoming.connection import WyomingServer
from csmserve.config import Settings
from csmserve.engine import Engine, create_engine
from csmserve.errors import CsmServeError
from csmserve.metrics import Metrics
from csmserve.server import demo, health
from csmserve.server.admission import Admission
from csmserve.server.auth import KeyChecker
from csmserve.server.errors import error_response, validation_error_response
from csmserve.server.guard import Guard
from csmserve.server.hosts import HostRule
from csmserve.server.state import ServerState
from csmserve.server.store import AudioStore
from csmserve.engine.watchdog import Watchdog
from csmserve.speech import Speech
from csmserve.speech.voices import VoiceBook
from csmserve.text.normalize import warm_up

log = logging.getLogger(__name__)
#: Voice uploads decoded at once (each in a worker thread); more wait, and past that get a 429.
DECODE_THREADS = 2


def build_state(settings: Settings, engine: Engine) -> ServerState:
    """Everything the routes share, for ``engine`` (not yet started)."""
    metrics = Metrics()
    voices = VoiceBook.from_settings(settings)
    for problem in voices.problems():
        log.warning("%s", problem)
    state = ServerState(
        settings=settings,
        engine=engine,
        speech=Speech(engine, settings, voices),
        store=AudioStore(settings.audio_dir, settings.audio_max_files, settings.audio_max_bytes, settings.audio_ttl_s),
        voices=voices,
        metrics=metrics,
        keys=KeyChecker(settings.api_keys),
        admission=Admission(
            metrics, lambda: settings.resolved_max_streams(engine.capacity().max_batch), settings.max_unauthenticated,
            settings.resolved_max_streams_per_key,
        ),
        watchdog=Watchdog(engine.capacity, settings.stall_timeout_s, armed=lambda: engine.info.ready),
    )
    metrics.watch_capacity(engine.capacity)
    if hasattr(engine, "prefill_positions"):
        metrics.watch_prefill(lambda: engine.prefill_positions)
    return state


async def load(
    state: ServerState, on_load_failed: Callable[[CsmServeError], None] | None, ready_url: str | None = None
) -> None:
    """Start the engine; a failure is recorded (``/health`` says it), logged and handed to ``on_load_failed``.
    Success logs ``ready`` with ``ready_url`` (default: the WebSocket URL)."""
    try:
        await state.engine.start()
    except Exception as exc:  # noqa: BLE001 - reported, and the server says so on /health
        if isinstance(exc, CsmServeError):
            error = exc
            log.error("model load failed: %s", exc.message)
        else:
            error = CsmServeError(f"model load failed: {type(exc).__name__}: {exc}")
            log.exception("model load failed")
        state.load_error = error
        state.engine.info.failed = error.message
        if on_load_failed:
            on_load_failed(error)
    else:
        log.info("ready: %s", ready_url or f"ws://{state.settings.host}:{state.settings.port}/ws/generate")


def build_app(state: ServerState, on_load_failed: Callable[[CsmServeError], None] | None = None) -> FastAPI:
    """The FastAPI app over ``state``: lifespan (load, watchdog), middleware, error shape, routes."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.decoders = anyio.CapacityLimiter(DECODE_THREADS)
        wyoming = None
        if state.settings.wyoming_port is not None:  # on this loop and engine: its requests join the batch
            wyoming = app.state.wyoming = WyomingServer(state, state.settings.wyoming_host, state.settings.wyoming_port)
            await wyoming.start()
        # The normalisation's word libraries take seconds to import: off the event loop, while the model loads.
        threading.Thread(target=warm_up, name="normalisation-warm-up", daemon=True).start()
        tasks = [asyncio.create_task(load(state, on_load_failed)), asyncio.create_task(state.watchdog.run())]
        try:
            yield
        finally:
            if wyoming is not None:
                await wyoming.close()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
            await state.engine.close()

    app = FastAPI(title="csmserve", version=__version__, lifespan=lifespan)
    app.state.csm = state
    app.add_middleware(Guard, state=state)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(CsmServeError)
    async def _csm_error(_request: Request, exc: CsmServeError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error_response(exc)

    app.include_router(health.router)
    app.include_router(seed.router)
    app.include_router(voices.router)
    app.include_router(openai.router)
    app.include_router(elevenlabs.router)
    app.include_router(demo.router)
    return app


def create_app(
    settings: Settings | None = None,
    engine: Engine | None = None,
    on_load_failed: Callable[[CsmServeError], None] | None = None,
) -> FastAPI:
    settings = settings or Settings()
    state = build_state(settings, engine or create_engine(settings))
    if not state.keys.enabled:
        log.warning(
            "no API keys configured (CSM_API_KEYS): anyone who can reach this port can use the model"
        )
        if not settings.allowed_hosts and HostRule.from_settings(settings, keys=False).names is None:
            log.warning(
                "no API keys and CSM_ALLOWED_HOSTS unset on %s: any Host name is answered, so a web page "
                "could reach this server through DNS rebinding; list the names clients use in CSM_ALLOWED_HOSTS",
                settings.host,
            )
    return build_app(state, on_load_failed)


async def serve_wyoming(
    settings: Settings, engine: Engine | None = None, stop: asyncio.Event | None = None
) -> CsmServeError | None:
    """``csmserve wyoming``: the Wyoming port alone, no HTTP (``CSM_WYOMING_PORT``, default 10200), until
    ``stop`` is set (the CLI sets it on SIGTERM or SIGINT) or the model fails to load. Then nothing new is
    admitted and streams in flight get ``drain_timeout_s`` to finish. Returns the load error, if any."""
    state = build_state(settings, engine or create_engine(settings))
    stop = stop or asyncio.Event()
    failure: list[CsmServeError] = []

    def load_failed(error: CsmServeError) -> None:
        failure.append(error)
        stop.set()

    port = settings.wyoming_port if settings.wyoming_port is not None else WYOMING_PORT
    server = WyomingServer(state, settings.wyoming_host, port)
    await server.start()
    loading = asyncio.create_task(load(state, load_failed, ready_url=f"tcp://{server.host}:{server.port}"))
    try:
        await stop.wait()
        state.admission.draining = True
        drained = asyncio.get_running_loop().time() + settings.drain_timeout_s
        while state.admission.active > 0 and asyncio.get_running_loop().time() < drained:
            await asyncio.sleep(0.05)
    finally:
        loading.cancel()
        with contextlib.suppress(BaseException):
            await loading
        await server.close()
        await state.engine.close()
    return failure[0] if failure else None
