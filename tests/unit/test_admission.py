"""Admission: the server's stream cap, and each tenant's quota within it."""

from __future__ import annotations

import pytest

from csmserve.config import Settings
from csmserve.errors import Overloaded
from csmserve.metrics import Metrics
from csmserve.server.admission import Admission


def test_a_tenant_past_its_quota_is_refused_while_others_still_get_in():
    """Quota 2 of 4: a third stream of one tenant is refused (and counted), another tenant's is admitted;
    leaving gives the tenant its place back."""
    metrics = Metrics()
    admission = Admission(metrics, 4, 8, 2)
    admission.enter("ws", "key-1")
    admission.enter("ws", "key-1")
    with pytest.raises(Overloaded, match="this API key"):
        admission.enter("ws", "key-1")
    admission.enter("ws", "key-2")
    assert (admission.active, admission.by_tenant) == (3, {"key-1": 2, "key-2": 1})
    admission.leave("key-1")
    admission.enter("ws", "key-1")
    assert metrics.registry.get_sample_value("csm_requests_total", {"endpoint": "ws", "outcome": "rejected"}) == 1


@pytest.mark.parametrize(
    ("keys", "max_streams", "quota"),
    [("", 16, 8), ("a,b", 16, 8), ("a", 16, 16), ("a,b", 1, 1)],
)
def test_the_default_quota_is_half_the_streams_unless_one_key_is_configured(keys, max_streams, quota):
    """Unset: half of max_streams (at least 1) when several tenants can exist; a single key gets it all."""
    assert Settings(api_keys=keys).resolved_max_streams_per_key(max_streams) == quota
    assert Settings(api_keys=keys, max_streams_per_key=3).resolved_max_streams_per_key(max_streams) == 3
