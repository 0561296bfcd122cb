"""The Ray Serve application's args become Ray deployment options (no cluster, no Ray import)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from csmserve.config import Settings
from csmserve.scaleout.options import ReplicaOptions


def test_autoscaling_targets_a_replicas_stream_capacity():
    """Unset replica count: autoscaling between min and max, the target the streams one replica serves."""
    options = ReplicaOptions(min_replicas=1, max_replicas=6).deployment_options(Settings(max_streams=16), cluster_gpus=8)
    assert options["autoscaling_config"]["target_ongoing_requests"] == 16  # min(max_streams, GPU max_batch 64)
    assert options["autoscaling_config"]["min_replicas"] == 1 and options["autoscaling_config"]["max_replicas"] == 6
    assert options["ray_actor_options"]["num_gpus"] == 1
    assert "num_replicas" not in options


def test_cpu_replicas_on_a_cluster_without_gpus_and_a_fixed_count():
    """num_gpus auto takes no GPU where there is none; a fixed count turns autoscaling off."""
    options = ReplicaOptions(num_replicas=2).deployment_options(Settings(max_streams=16), cluster_gpus=0)
    assert options["ray_actor_options"]["num_gpus"] == 0 and options["num_replicas"] == 2
    assert "autoscaling_config" not in options


def test_ray_waits_longer_than_the_replicas_own_drain():
    """Ray kills a stopping replica only after its drain (drain_timeout_s) had time to end."""
    options = ReplicaOptions(graceful_shutdown_timeout_s=40)
    settings = Settings(**options.replica_settings())
    assert settings.drain_timeout_s == 40
    assert options.deployment_options(settings, 0)["graceful_shutdown_timeout_s"] > 40


def test_an_unknown_arg_is_refused_at_deploy_time():
    """A misspelt key in the Serve config's args fails the deploy with its name."""
    with pytest.raises(ValidationError, match="min_replica"):
        ReplicaOptions.model_validate({"min_replica": 2})
