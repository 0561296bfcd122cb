"""`csmserve serve` as a real child process on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from support.servers import LoopbackUrls


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess(LoopbackUrls):
    process: subprocess.Popen
    port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()


@contextlib.contextmanager
def server_process(tmp: Path, *args: str, env: dict | None = None, ready_timeout: float = 60.0):
    """Start the server (fake engine unless args say otherwise), wait for /health, stop it after."""
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CSM_")}
    full_env.update(CSM_AUDIO_DIR=str(tmp / "audio"), CSM_VOICES_DIR=str(tmp / "voices"))
    full_env.update(env or {})
    log_path = tmp / f"server-{port}.log"
    log = open(log_path, "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "csmserve", "serve", "--host", "127.0.0.1", "--port", str(port), *args],
        env=full_env, stdout=log, stderr=subprocess.STDOUT,
    )
    server = ServerProcess(process, port, log_path)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError("server exited:\n" + server.log())
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(server.http + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("server never became healthy:\n" + server.log())
            time.sleep(0.1)
        yield server
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(20)
        log.close()
