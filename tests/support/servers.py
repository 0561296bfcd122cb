"""Run a real uvicorn server in a background thread on an ephemeral loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass

import httpx
import uvicorn
from uvicorn.config import LOGGING_CONFIG


class LoopbackUrls:
    """``http`` and ``ws`` URLs of a server listening on ``127.0.0.1:self.port``."""

    port: int

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/generate"


@dataclass
class RunningServer(LoopbackUrls):
    app: object
    engine: object
    port: int

    def wait_ready(self, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = httpx.get(self.http + "/health", timeout=5).json()
            if body["status"] == "healthy":
                return body
            if body["status"] == "failed":
                raise RuntimeError(f"model failed to load: {body}")
            time.sleep(0.05)
        raise TimeoutError("server did not become healthy")


@contextlib.contextmanager
def running_server(settings, engine=None, on_load_failed=None):
    from csmserve.app import create_app
    from csmserve.server.serving import uvicorn_config

    app = create_app(settings, engine, on_load_failed=on_load_failed)
    config = uvicorn_config(app, settings, host="127.0.0.1", port=0, log_level="warning", log_config=LOGGING_CONFIG, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield RunningServer(app, app.state.csm.engine, port)
    finally:
        server.should_exit = True
        thread.join(15)
