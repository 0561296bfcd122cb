"""A Ray Serve application's ``args`` (the Serve config file): replicas, resources, scaling, metrics.

Plain data, checked when the application is deployed; :meth:`ReplicaOptions.deployment_options`
turns it into Ray's deployment options. Imports neither Ray nor torch.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from csmserve.config import Settings


class ReplicaOptions(BaseModel):
    """Everything ``args`` may hold; an unknown key is an error at deploy time."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    settings: dict[str, Any] = Field(
        default_factory=dict, description="csmserve settings (Settings fields); CSM_* variables fill the rest."
    )
    num_replicas: int | None = Field(None, ge=1, description="A fixed replica count; unset: autoscaling.")
    min_replicas: int = Field(1, ge=0, description="Autoscaling floor.")
    max_replicas: int = Field(4, ge=1, description="Autoscaling ceiling (one GPU each on a GPU cluster).")
    streams_per_replica: int | None = Field(
        None, ge=1, description="Autoscaling target per replica. Unset: min(max_streams, max_batch) of its settings."
    )
    upscale_delay_s: float = Field(10.0, ge=0, description="Load above target this long adds replicas.")
    downscale_delay_s: float = Field(300.0, ge=0, description="Load below target this long removes replicas.")
    num_gpus: float | Literal["auto"] = Field("auto", description="GPUs per replica; auto: 1 when the cluster has any.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica.")
    graceful_shutdown_timeout_s: float | None = Field(
        None, ge=0, description="How long a stopping replica's streams may finish. Unset: the drain_timeout_s setting."
    )
    health_check_period_s: float = Field(10.0, gt=0, description="Ray calls each replica's health check this often.")
    health_check_timeout_s: float = Field(30.0, gt=0, description="A health check slower than this fails.")
    metrics_host: str = Field("0.0.0.0", description="Address of each replica's own metrics listener.")
    metrics_port: int = Field(
        9464, ge=0, le=65535, description="First port tried for it (the next free one per replica); 0: none."
    )

    def gpus(self, cluster_gpus: float) -> float:
        """GPUs each replica reserves, given the cluster's total."""
        if self.num_gpus == "auto":
            return 1.0 if cluster_gpus >= 1 else 0.0
        return float(self.num_gpus)

    def capacity(self, settings: Settings, gpus: float) -> int:
        """Streams one replica serves at full speed: what the autoscaler aims at per replica."""
        if self.streams_per_replica is not None:
            return self.streams_per_replica
        batch = settings.resolved_max_batch("cuda" if gpus else "cpu")
        return min(settings.resolved_max_streams(batch), batch)

    def deployment_options(self, settings: Settings, cluster_gpus: float) -> dict[str, Any]:
        """Keyword arguments for Ray's ``Deployment.options``."""
        gpus = self.gpus(cluster_gpus)
        capacity = self.capacity(settings, gpus)
        streams = settings.resolved_max_streams(settings.resolved_max_batch("cuda" if gpus else "cpu"))
        graceful = settings.drain_timeout_s if self.graceful_shutdown_timeout_s is None else self.graceful_shutdown_timeout_s
        options: dict[str, Any] = {
            "ray_actor_options": {"num_gpus": gpus, "num_cpus": self.num_cpus},
            # Open connections (an idle WebSocket is one) beyond the streams a replica admits at once.
            "max_ongoing_requests": 2 * max(capacity, streams),
            # Ray kills a stopping replica after this; the replica's own drain must end first.
            "graceful_shutdown_timeout_s": graceful + 5,
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

    def replica_settings(self) -> dict[str, Any]:
        """The settings a replica starts with: ``settings``, and the drain matching Ray's timeout."""
        if self.graceful_shutdown_timeout_s is None:
            return dict(self.settings)
        return {"drain_timeout_s": self.graceful_shutdown_timeout_s, **self.settings}
