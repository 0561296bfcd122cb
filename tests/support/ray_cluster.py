"""One local Ray cluster with csmserve deployed from deploy/ray/local.yaml, on loopback ports."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from support.processes import free_port
from support.servers import LoopbackUrls

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "ray" / "local.yaml"
APP = "csmserve"


@dataclass
class RayServe(LoopbackUrls):
    """Ray's proxy on ``127.0.0.1:port`` in front of the ``csmserve`` application."""

    port: int
    application: dict
    http_options: dict
    metrics_ports: range = field(default_factory=lambda: range(0))

    @property
    def args(self) -> dict:
        return self.application["args"]

    def deploy(self, timeout: float = 300.0, **deployment_options) -> None:
        """Deploy the application from its config, as `serve run FILE` does (Serve's controller
        imports and builds it), and wait until its replicas run. ``deployment_options`` go under
        ``deployments:``: unlike a change of ``args``, a change there updates replicas in place."""
        from ray.serve.context import _get_global_client
        from ray.serve.schema import ServeDeploySchema

        from csmserve.ray_app import DEPLOYMENT

        application = dict(self.application)
        if deployment_options:
            application["deployments"] = [{"name": DEPLOYMENT, **deployment_options}]
        config = ServeDeploySchema.model_validate({"http_options": self.http_options, "applications": [application]})
        _get_global_client().deploy_apps(config)
        replicas = deployment_options.get("num_replicas", self.args["num_replicas"])
        deadline = time.monotonic() + timeout
        while not (self.deployed() and self.replica_states() == {"RUNNING": replicas}):
            if time.monotonic() > deadline:
                raise TimeoutError(f"csmserve did not reach {replicas} running replicas: {self.status()}")
            time.sleep(0.2)

    def status(self):
        from ray import serve

        return serve.status().applications.get(APP)

    def deployed(self) -> bool:
        status = self.status()
        return status is not None and status.status == "RUNNING"

    def replica_states(self) -> dict[str, int]:
        from csmserve.ray_app import DEPLOYMENT

        status = self.status()
        if status is None or DEPLOYMENT not in status.deployments:
            return {}
        return {state: n for state, n in status.deployments[DEPLOYMENT].replica_states.items() if n}

    def kill(self, replica: str) -> None:
        """Kill one replica's process at once (no graceful shutdown), as a crash would."""
        import ray

        from csmserve.ray_app import DEPLOYMENT

        actor = ray.get_actor(f"SERVE_REPLICA::{APP}#{DEPLOYMENT}#{replica}", namespace="serve")
        ray.kill(actor, no_restart=True)


@contextlib.contextmanager
def node_environment(variables: dict[str, str]):
    """``variables`` in this process's environment while Ray's node processes start (they and the
    replicas they spawn keep them), as on a node where an operator set them; restored after."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def ray_serve(settings: dict, replica_args: dict | None = None, node_env: dict[str, str] | None = None):
    """Start a local Ray cluster (loopback, no dashboard, no usage stats) whose nodes have ``node_env``,
    deploy the application of deploy/ray/local.yaml with ``settings`` and ``replica_args`` merged in,
    and stop it all after."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from ray import serve

    config = yaml.safe_load(CONFIG.read_text())
    (application,) = config["applications"]
    metrics_port = free_port()
    args = {**application["args"], "metrics_host": "127.0.0.1", "metrics_port": metrics_port, **(replica_args or {})}
    args["settings"] = {**args.get("settings", {}), **settings}
    http_options = {**config["http_options"], "host": "127.0.0.1", "port": free_port()}
    # A short folder of our own: Ray's default /tmp/ray is shared with any other cluster on the machine.
    temp_dir = tempfile.mkdtemp(prefix="csmray")
    with node_environment(node_env or {}):
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            object_store_memory=96 * 1024 * 1024,
            _node_ip_address="127.0.0.1",
            _temp_dir=temp_dir,
            log_to_driver=False,
        )
    try:
        serve.start(http_options=http_options)
        cluster = RayServe(
            http_options["port"], {**application, "args": args}, http_options, range(metrics_port, metrics_port + 8)
        )
        cluster.deploy()
        yield cluster
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
