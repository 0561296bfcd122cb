"""How ``csmserve serve`` runs: one process, or engine processes fed by several API workers.

One API worker (the default on a CPU): uvicorn in this process; the engine runs on a thread here, or in
its own process (``engine_process``), which the app starts and supervises itself.

Several API workers (``api_workers`` above 1; the default on a GPU host)::

    csmserve serve (this process: supervisor)
     ├── engine process per GPU   (model thread + I/O thread; restarted when it dies)
     └── API worker x N           (uvicorn + the routes; share one listening socket)
          └── EngineClient ──ipc──┘ (requests, cancels and credits in; one message per step out)

The supervisor binds the listening socket, starts the engines, then the workers, and restarts a worker
that dies. On SIGTERM or SIGINT it passes the signal to the workers, which drain their streams
(``drain_timeout_s``) and exit, then stops the engines: no process outlives it. A model that cannot be
loaded at the first start stops everything with the load-failure exit code, as in one process.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time

from csmserve.config import Settings

log = logging.getLogger("csmserve")

EXIT_LOAD_FAILED = 3


class DrainingServer:
    """uvicorn's server, with a graceful drain on SIGTERM/SIGINT.

    First signal: the app stops admitting (``/ready`` 503, new WebSocket requests closed 1013) and
    in-flight streams get up to ``drain_timeout_s`` to finish; then uvicorn shuts down. A second
    signal exits at once.
    """

    def __init__(self, config, state):
        import uvicorn

        self.state = state
        outer = self

        class _Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                if outer.state.admission.draining or self.should_exit:
                    return super().handle_exit(sig, frame)
                outer.state.admission.draining = True
                log.warning(
                    "draining: %d stream(s) in flight, up to %.0f s", outer.state.admission.active,
                    outer.state.settings.drain_timeout_s,
                )
                outer.loop.call_soon_threadsafe(lambda: outer.loop.create_task(outer.drain()))

        self.server = _Server(config)
        self.loop = None

    async def drain(self) -> None:
        deadline = time.monotonic() + self.state.settings.drain_timeout_s
        while self.state.admission.active > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        log.warning("drained (%d stream(s) left); shutting down", self.state.admission.active)
        self.server.should_exit = True

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await self.server.serve(sockets=sockets)

    @property
    def should_exit(self) -> bool:
        return self.server.should_exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self.server.should_exit = value


def serve(settings: Settings) -> int:
    """Run the server as ``settings`` say until it is stopped; the process's exit code."""
    if settings.resolved_api_workers() > 1:
        return serve_workers(settings, settings.resolved_api_workers())
    return serve_here(settings)


def serve_here(settings: Settings, sockets: list[socket.socket] | None = None) -> int:
    """uvicorn and the app in this process (the engine beside it, or its own supervised process)."""
    from csmserve.app import create_app
    from csmserve.server.serving import uvicorn_config

    failure: list = []

    def on_load_failed(error) -> None:
        failure.append(error)
        server.should_exit = True

    app = create_app(settings, on_load_failed=on_load_failed)
    server = DrainingServer(uvicorn_config(app, settings), app.state.csm)
    asyncio.run(server.serve(sockets))
    if failure:
        print(f"error: {failure[0].message}", file=sys.stderr)
        return EXIT_LOAD_FAILED
    return 0


def api_worker(settings_json: str, sockets: list[socket.socket]) -> None:
    """An API worker's entry point (spawned): the app, connected to the engine processes."""
    settings = Settings.model_validate_json(settings_json)
    from csmserve.logs import setup_logging

    setup_logging(settings.log_level, settings.log_format)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides; a terminal's ^C reaches it too
    sys.exit(serve_here(settings, sockets))


def listening_socket(settings: Settings) -> socket.socket:
    """The one socket every API worker accepts on (``port`` 0: a free one)."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve_workers(settings: Settings, workers: int) -> int:
    """The supervisor: engine processes, ``workers`` API workers on one socket, and their lifetimes."""
    from csmserve.engine import engine_devices
    from csmserve.engine.supervisor import EngineSupervisor, engine_address

    engines = [EngineSupervisor(settings, engine_address(), device=device) for device in engine_devices(settings)]
    sock = listening_socket(settings)
    port = sock.getsockname()[1]
    metrics_dir = tempfile.mkdtemp(prefix="csmserve-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # the workers inherit it: one /metrics for all
    worker_settings = settings.model_copy(
        update={"engine_address": ",".join(e.address for e in engines), "api_workers": 1, "port": port}
    )
    stopping = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stopping.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    context = multiprocessing.get_context("spawn")
    processes: list[multiprocessing.Process] = []

    def start_worker(index: int) -> multiprocessing.Process:
        # One Wyoming listener (Home Assistant's port) for the whole server: the first worker's.
        own = worker_settings if index == 0 else worker_settings.model_copy(update={"wyoming_port": None})
        process = context.Process(target=api_worker, args=(own.model_dump_json(), [sock]), name=f"csmserve-api-{index}")
        process.start()
        return process

    code = 0
    try:
        for engine in engines:
            engine.start()
        processes = [start_worker(i) for i in range(workers)]
        log.info("serving on %s:%d: %d API workers, %d engine process(es)", settings.host, port, workers, len(engines))
        while not stopping.wait(0.2):
            if any(engine.gave_up for engine in engines):
                log.error("the model could not be loaded; stopping")
                code = EXIT_LOAD_FAILED
                break
            for index, process in enumerate(processes):
                if not process.is_alive():
                    _forget_dead(process.pid)
                    if process.exitcode == EXIT_LOAD_FAILED:
                        code = EXIT_LOAD_FAILED
                        stopping.set()
                        break
                    log.error("API worker %d (pid %d) exited with code %s; starting another",
                              index, process.pid, process.exitcode)
                    processes[index] = start_worker(index)
    finally:
        _stop_workers(processes, settings.drain_timeout_s + 15)
        for engine in engines:
            engine.stop()
        sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code


def _stop_workers(processes: list[multiprocessing.Process], timeout: float) -> None:
    """SIGTERM every worker (each drains its streams), wait up to ``timeout``, then SIGKILL."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            log.warning("API worker %d did not stop in time; killing it", process.pid)
            process.kill()
            process.join(5)


def _forget_dead(pid: int | None) -> None:
    """A dead worker's live gauges no longer count (prometheus-client's multiprocess mode)."""
    if pid is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
