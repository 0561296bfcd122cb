"""The application factory: one engine, one audio store, the routes, and loading in the background.

The server listens while the model loads (``/health`` says ``loading`` with 503) and reports
``healthy`` once the engine is ready. A load failure is logged with its actionable message and
handed to ``on_load_failed`` (the CLI uses it to exit non-zero).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from csmserve import __version__
from csmserve.config import Settings
from csmserve.engine import Engine, create_engine
from csmserve.errors import CsmServeError, Overloaded
from csmserve.metrics import Metrics
from csmserve.protocol import Limits
from csmserve.server.auth import KeyChecker
from csmserve.server.guard import Guard
from csmserve.server.watchdog import Watchdog
from csmserve.server.store import AudioStore
from csmserve.voices import VoiceStore

log = logging.getLogger(__name__)
#: Voice uploads decoded at once (each in a worker thread); more wait, and past that get a 429.
DECODE_THREADS = 2


@dataclass
class ServerState:
    settings: Settings
    engine: Engine
    store: AudioStore
    voices: VoiceStore
    limits: Limits
    metrics: Metrics
    keys: KeyChecker
    load_error: CsmServeError | None = None
    #: Set on SIGTERM: /ready is 503, new requests are refused, in-flight ones finish.
    draining: bool = False
    active: int = 0
    #: WebSockets accepted without a key that have not yet sent one (capped: max_unauthenticated).
    unauthenticated: int = 0
    watchdog: Watchdog | None = None
    #: Voice uploads decode here, off the event loop, a few at a time.
    decoders: anyio.CapacityLimiter | None = None

    def enter(self, endpoint: str) -> None:
        """Admit one streaming request, or count it as rejected and raise :class:`Overloaded`
        (WebSocket 1013, HTTP 429)."""
        limit = self.settings.resolved_max_streams(self.engine.capacity().max_batch)
        if self.draining or self.active >= limit:
            self.metrics.finished(endpoint, "rejected")
            if self.draining:
                raise Overloaded("the server is shutting down; reconnect to another instance")
            raise Overloaded(f"{limit} requests are streaming already; retry shortly")
        self.active += 1
        self.metrics.active_streams.set(self.active)

    def leave(self) -> None:
        self.active -= 1
        self.metrics.active_streams.set(self.active)

    @property
    def ready(self) -> bool:
        stalled = self.watchdog is not None and self.watchdog.stalled() is not None
        return self.engine.info.ready and not self.draining and not self.engine.info.failed and not stalled


def limits_from(settings: Settings) -> Limits:
    return Limits(
        max_text_chars=settings.max_text_chars,
        min_speaker_id=settings.min_speaker_id,
        max_speaker_id=settings.max_speaker_id,
        max_audio_ms=settings.max_audio_ms,
        default_chunk_ms=settings.default_chunk_ms,
    )


def create_app(
    settings: Settings | None = None,
    engine: Engine | None = None,
    on_load_failed: Callable[[CsmServeError], None] | None = None,
) -> FastAPI:
    settings = settings or Settings()
    engine = engine or create_engine(settings)
    state = ServerState(
        settings=settings,
        engine=engine,
        store=AudioStore(settings.audio_dir, settings.audio_max_files, settings.audio_max_bytes, settings.audio_ttl_s),
        voices=VoiceStore(settings.voices_dir),
        limits=limits_from(settings),
        metrics=Metrics(),
        keys=KeyChecker(settings.api_keys),
        watchdog=Watchdog(engine.capacity, settings.stall_timeout_s, armed=lambda: engine.info.ready),
    )
    state.metrics.watch_capacity(engine.capacity)
    if hasattr(engine, "prefill_positions"):
        state.metrics.watch_prefill(lambda: engine.prefill_positions)
    if not state.keys.enabled:
        log.warning(
            "no API keys configured (CSM_API_KEYS): anyone who can reach this port can use the model"
        )

    async def load() -> None:
        try:
            await engine.start()
        except CsmServeError as exc:
            state.load_error = exc
            engine.info.failed = exc.message
            log.error("model load failed: %s", exc.message)
            if on_load_failed:
                on_load_failed(exc)
        except Exception as exc:  # noqa: BLE001 - reported, and the server says so on /health
            state.load_error = CsmServeError(f"model load failed: {type(exc).__name__}: {exc}")
            engine.info.failed = state.load_error.message
            log.exception("model load failed")
            if on_load_failed:
                on_load_failed(state.load_error)
        else:
            log.info("ready: ws://%s:%s/ws/generate", settings.host, settings.port)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.decoders = anyio.CapacityLimiter(DECODE_THREADS)
        tasks = [asyncio.create_task(load()), asyncio.create_task(state.watchdog.run())]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
            await engine.close()

    app = FastAPI(title="csmserve", version=__version__, lifespan=lifespan)
    app.state.csm = state

    app.add_middleware(Guard, state=state)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(CsmServeError)
    async def _csm_error(_request: Request, exc: CsmServeError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.http_status in (429, 503) else None
        return JSONResponse({"error": exc.to_dict()}, status_code=exc.http_status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        messages = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            messages.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return JSONResponse(
            {"error": {"code": "invalid_request", "message": "; ".join(messages) or "invalid request"}},
            status_code=422,
        )

    from csmserve.server import demo, elevenlabs_http, elevenlabs_ws, health, openai_api, rest, voices_api, ws

    app.include_router(health.router)
    app.include_router(rest.router)
    app.include_router(ws.router)
    app.include_router(voices_api.router)
    app.include_router(openai_api.router)
    app.include_router(elevenlabs_ws.router)
    app.include_router(elevenlabs_http.router)
    app.include_router(demo.router)
    return app
