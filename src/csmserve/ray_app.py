"""csmserve as a Ray Serve application: replicas that each own one engine, behind Ray's proxy.

Each replica is the single server's FastAPI app (:func:`~csmserve.app.create_app`), every
route and every rule included, built inside the replica process with its own engine: one GPU per
replica on a GPU cluster, CPU replicas elsewhere. Ray's proxy spreads WebSocket connections and HTTP
requests over the replicas; its autoscaler counts ongoing requests (an open WebSocket is one) against
a target set from a replica's stream capacity (:class:`~csmserve.scaleout.options.ReplicaOptions`).

Settings reach a replica as they reach the single server: ``CSM_*`` variables on the node (secrets
belong there), plus the ``settings`` mapping of the application's ``args`` in the Serve config file
(``deploy/ray/serve.yaml``), which wins.

A replica takes traffic once its model is loaded; then Ray's health check follows the server's
readiness (a failed engine: Ray replaces the replica). When Ray stops a replica (downscaling,
``serve shutdown``), the replica drains as the single server does on SIGTERM: new requests are
refused, running streams finish, then its WebSockets close with 1013 and Ray lets it go.

Each replica names itself in ``done`` frames, an ``x-csm-replica`` header, its log lines and the
``replica`` label of its metrics, served on a port of its own (see :mod:`csmserve.scaleout.replica`).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from ray import serve

from csmserve.config import Settings
from csmserve.scaleout.options import ReplicaOptions
from csmserve.scaleout.replica import (
    OpenSockets,
    ReplicaLogFilter,
    ReplicaStamp,
    TrackSockets,
    health_problem,
    labelled_registry,
    prepare_offline_model,
    replica_lifespan,
    serve_metrics,
)

log = logging.getLogger(__name__)

DEPLOYMENT = "CsmReplica"


def ray_is_stopping_this_replica() -> bool:
    """Whether Ray has begun this replica's graceful shutdown.

    Ray's own drain only waits for open requests, and an open WebSocket is one until the client
    closes it, so an idle voice-agent connection would hold a stopping replica until Ray kills it.
    Ray has no public signal for "you are stopping"; this reads the replica actor's flag, and says
    False (no early drain; Ray's timeout still applies) if Ray's internals ever differ."""
    try:
        import ray

        worker = ray._private.worker.global_worker
        actor = worker.actors.get(worker.actor_id)
        return bool(actor._replica_impl._shutting_down)
    except Exception:  # noqa: BLE001 - best effort by design
        return False


@serve.deployment(name=DEPLOYMENT)
@serve.ingress()
class CsmReplica:
    """One replica: the single server's app with its own engine, named after Ray's replica id."""

    def __init__(self, settings: dict[str, Any], metrics_host: str = "0.0.0.0", metrics_port: int = 0):
        from csmserve.logs import setup_logging
        from csmserve.app import create_app

        self.name = serve.get_replica_context().replica_tag
        self.settings = Settings(**settings)
        setup_logging(self.settings.log_level, self.settings.log_format, self.settings.log_query_strings)
        for handler in logging.getLogger().handlers:
            handler.addFilter(ReplicaLogFilter(self.name))
        prepare_offline_model(self.settings)
        self.server = create_app(self.settings)
        self.state = self.server.state.csm
        sockets = OpenSockets()
        self.server.router.lifespan_context = replica_lifespan(
            self.server.router.lifespan_context, self.state, ray_is_stopping_this_replica, sockets
        )
        self.server.add_middleware(TrackSockets, sockets=sockets)
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
        """Ray's health check: healthy while the server is ready (never once its engine failed)."""
        problem = health_problem(self.state)
        if problem is not None:
            raise RuntimeError(f"replica {self.name} is not healthy: {problem}")


def build(args: dict[str, Any] | None = None) -> serve.Application:
    """The application builder the Serve config file names (``import_path: csmserve.ray_app:build``)."""
    import ray

    options = ReplicaOptions.model_validate(args or {})
    settings = Settings(**options.replica_settings())  # invalid settings fail the deploy, not each replica
    cluster_gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    deployment = CsmReplica.options(**options.deployment_options(settings, cluster_gpus))
    return deployment.bind(options.replica_settings(), options.metrics_host, options.metrics_port)
