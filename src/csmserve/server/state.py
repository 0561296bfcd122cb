"""What every route of one app shares, typed: settings, the speech layer over the engine, stores,
metrics, keys, admission and the watchdog. Built once by :func:`csmserve.app.create_app`."""

from __future__ import annotations

from dataclasses import dataclass

import anyio
from starlette.requests import HTTPConnection

from csmserve.config import Settings
from csmserve.engine import Engine
from csmserve.errors import CsmServeError
from csmserve.metrics import Metrics
from csmserve.server.admission import Admission
from csmserve.server.auth import KeyChecker, tenant_of
from csmserve.server.store import AudioStore
from csmserve.engine.watchdog import Watchdog
from csmserve.speech import Speech
from csmserve.speech.voices import VoiceBook


@dataclass
class ServerState:
    settings: Settings
    engine: Engine
    speech: Speech
    store: AudioStore
    #: The registered voices (``voices.store``), the operator's voice map and default voice.
    voices: VoiceBook
    metrics: Metrics
    keys: KeyChecker
    admission: Admission
    watchdog: Watchdog
    load_error: CsmServeError | None = None
    #: Voice uploads decode here, off the event loop, a few at a time (set when the app starts).
    decoders: anyio.CapacityLimiter | None = None

    def tenant(self, conn: HTTPConnection) -> str:
        """Whom ``conn``'s requests act for: its key's id, or its client address (:func:`tenant_of`)."""
        return tenant_of(conn, self.keys)

    @property
    def ready(self) -> bool:
        """Whether the server takes work: engine loaded and sound, not draining, not stalled."""
        stalled = self.watchdog.stalled() is not None
        info = self.engine.info
        return info.ready and not self.admission.draining and not info.failed and not stalled


def state_of(conn: HTTPConnection) -> ServerState:
    """The state of the app serving ``conn`` (an HTTP request or a WebSocket)."""
    return conn.app.state.csm
