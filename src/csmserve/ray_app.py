"""csmserve as a Ray Serve application: replicas that each own one engine, behind Ray's proxy.

Each replica is the single server's FastAPI app (:func:`~csmserve.server.app.create_app`), every
route and every rule included, built inside the replica process with its own engine: one GPU per
replica on a GPU cluster, CPU replicas elsewhere. Ray's proxy spreads WebSocket connections and HTTP
requests over the replicas; its autoscaler counts ongoing requests (an open WebSocket is one) against
a target set from a replica's stream capacity.

Settings reach a replica as they reach the single server: ``CSM_*`` variables on the node (secrets
belong there), plus the ``settings`` mapping of the application's ``args`` in the Serve config file
(``deploy/ray/serve.yaml``), which wins.

A replica is routed to only once its model is loaded (the app's start-up waits for it); afterwards
Ray's health check follows the server's readiness (a failed engine, a stuck worker: Ray replaces the
replica). Ray stops a replica (downscaling, ``serve shutdown``) only after its open connections end,
within ``graceful_shutdown_timeout_s``, so a running stream finishes.

Each replica names itself: in every ``done`` frame (``"replica"``), in an ``x-csm-replica`` header on
HTTP responses, in its log lines, and as the ``replica`` label of its Prometheus metrics, which it
serves on a port of its own (``metrics_port``, the next free one when two replicas share a node).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from csmserve.config import Settings

log = logging.getLogger(__name__)

DEPLOYMENT = "CsmReplica"
#: Ports tried from ``metrics_port`` upwards, one per replica on a node.
METRICS_PORTS_PER_NODE = 64


class ReplicaOptions(BaseModel):
    """The application's ``args`` (Serve config file): replicas, resources and scaling."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    settings: dict[str, Any] = Field(default_factory=dict, description="Settings fields; CSM_* variables fill the rest.")
    num_replicas: int | None = Field(None, ge=1, description="A fixed count; unset: autoscaling.")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    streams_per_replica: int | None = Field(
        None, ge=1, description="Autoscaling target. Unset: min(max_streams, max_batch) of a replica's settings."
    )
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(300.0, ge=0)
    num_gpus: float | Literal["auto"] = Field("auto", description="Per replica; auto: 1 when the cluster has GPUs.")
    num_cpus: float = Field(1.0, ge=0)
    graceful_shutdown_timeout_s: float | None = Field(
        None, ge=0, description="How long a stopping replica's streams may finish. Unset: drain_timeout_s."
    )
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    metrics_host: str = Field("0.0.0.0", description="Address of each replica's metrics listener.")
    metrics_port: int = Field(9464, ge=0, le=65535, description="First port tried; 0: no metrics listener.")

    def capacity(self, settings: Settings, gpus: float) -> int:
        """Streams one replica serves at full speed: what the autoscaler aims at."""
        if self.streams_per_replica is not None:
            return self.streams_per_replica
        return min(settings.max_streams, settings.resolved_max_batch("cuda" if gpus else "cpu"))

    def gpus(self, cluster_gpus: float) -> float:
        if self.num_gpus == "auto":
            return 1.0 if cluster_gpus >= 1 else 0.0
        return float(self.num_gpus)

    def deployment_options(self, settings: Settings, cluster_gpus: float) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``."""
        gpus = self.gpus(cluster_gpus)
        capacity = self.capacity(settings, gpus)
        options: dict[str, Any] = {
            "ray_actor_options": {"num_gpus": gpus, "num_cpus": self.num_cpus},
            # Open connections, idle ones included, beyond the streams admitted at once.
            "max_ongoing_requests": 2 * max(capacity, settings.max_streams),
            "graceful_shutdown_timeout_s": (
                settings.drain_timeout_s if self.graceful_shutdown_timeout_s is None else self.graceful_shutdown_timeout_s
            ),
            "graceful_shutdown_wait_loop_s": 0.5,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
        }
        if self.num_replicas is not None:
            options["num_replicas"] = self.num_replicas
        else:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "max_replicas": max(self.max_replicas, self.min_replicas),
                "target_ongoing_requests": capacity,
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s,
            }
        return options


# -- pieces a replica adds around the single server's app ------------------------------------------


class ReplicaStamp:
    """ASGI middleware: the replica's name in every ``done`` frame and on every HTTP response."""

    def __init__(self, app, replica: str):
        self.server = app
        self.replica = replica
        self.header = (b"x-csm-replica", replica.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.server(scope, receive, send)

        async def stamped(message) -> None:
            kind = message["type"]
            if kind in ("http.response.start", "websocket.accept"):
                message = {**message, "headers": [*message.get("headers", ()), self.header]}
            elif kind == "websocket.send":
                text = message.get("text")
                if text is not None and text.startswith('{"done"'):  # protocol.done_event / error_event
                    event = json.loads(text)
                    event["replica"] = self.replica
                    message = {**message, "text": json.dumps(event)}
            await send(message)

        await self.server(scope, receive, stamped)


class ReplicaLogFilter(logging.Filter):
    """Names the replica in every log line (text and JSON alike, in the message)."""

    def __init__(self, replica: str):
        super().__init__()
        self.prefix = f"[replica {replica}] "

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(self.prefix):
            record.msg, record.args = self.prefix + message, ()
        return True


def labelled_registry(registry, **labels: str):
    """A registry that exports every sample of ``registry`` with ``labels`` added (at scrape time)."""
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
    """Serve ``registry`` on the first free port from ``first_port``; the port, or None if none was free."""
    from prometheus_client import start_http_server

    for port in range(first_port, first_port + METRICS_PORTS_PER_NODE):
        try:
            start_http_server(port, addr=host, registry=registry)
        except OSError:
            continue
        return port
    log.warning("no free metrics port from %d: this replica's metrics are only on /metrics", first_port)
    return None


def ready_before_traffic(lifespan, state):
    """Wrap the app's lifespan so start-up returns only when the model is loaded.

    Ray routes to a replica once its start-up has returned: a replica that is still loading gets no
    traffic, and one whose model fails to load fails to start (Ray retries it elsewhere)."""

    @contextlib.asynccontextmanager
    async def wait_for_model(app):
        async with lifespan(app) as value:
            while not state.engine.info.ready:
                if state.load_error is not None or state.engine.info.failed:
                    message = state.load_error.message if state.load_error else state.engine.info.failed
                    raise RuntimeError(f"model load failed: {message}")
                await asyncio.sleep(0.05)
            yield value

    return wait_for_model


@serve.deployment(name=DEPLOYMENT)
@serve.ingress()
class CsmReplica:
    """One replica: the single server's app, its own engine, named after Ray's replica id."""

    def __init__(self, settings: dict[str, Any], metrics_host: str = "0.0.0.0", metrics_port: int = 0):
        from csmserve.logs import setup_logging
        from csmserve.server.app import create_app

        self.name = serve.get_replica_context().replica_tag
        self.settings = Settings(**settings)
        setup_logging(self.settings.log_level, self.settings.log_format)
        for handler in logging.getLogger().handlers:
            handler.addFilter(ReplicaLogFilter(self.name))
        self.server = create_app(self.settings)
        self.state = self.server.state.csm
        self.server.router.lifespan_context = ready_before_traffic(self.server.router.lifespan_context, self.state)
        self.server.add_middleware(ReplicaStamp, replica=self.name)
        self.metrics_port = None
        if metrics_port:
            registry = labelled_registry(self.state.metrics.registry, replica=self.name)
            self.metrics_port = serve_metrics(registry, metrics_host, metrics_port)
        self.server.add_api_route("/replica", self.describe, methods=["GET"], include_in_schema=False)
        log.info("replica %s: pid %d, metrics port %s", self.name, os.getpid(), self.metrics_port)

    def __serve_build_asgi_app__(self):
        return self.server

    async def describe(self) -> dict:
        """Which replica answered, where it runs, and where its metrics are."""
        return {
            "replica": self.name,
            "actor": serve.get_replica_context().replica_id.to_full_id_str(),
            "node": socket.gethostname(),
            "pid": os.getpid(),
            "metrics_port": self.metrics_port,
            "ready": self.state.ready,
        }

    async def check_health(self) -> None:
        """Ray's health check: healthy while the server is ready (never once the model failed)."""
        if not self.state.ready:
            info = self.state.engine.info
            reason = info.failed or (self.state.load_error and self.state.load_error.message)
            reason = reason or ("draining" if self.state.draining else "not ready")
            raise RuntimeError(f"replica {self.name} is not healthy: {reason}")


def build(args: dict[str, Any] | None = None) -> serve.Application:
    """The application builder the Serve config file names (``import_path: csmserve.ray_app:build``)."""
    import ray

    options = ReplicaOptions.model_validate(args or {})
    settings = Settings(**options.settings)  # invalid settings fail the deploy, not every replica
    cluster_gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    deployment = CsmReplica.options(**options.deployment_options(settings, cluster_gpus))
    return deployment.bind(options.settings, options.metrics_host, options.metrics_port)
