"""Which Host names the server answers for (DNS rebinding), by its settings."""

from __future__ import annotations

import pytest

from csmserve.config import Settings
from csmserve.server.hosts import HostRule


def rule(keys: bool = False, **settings) -> HostRule:
    return HostRule.from_settings(Settings(**settings), keys=keys)


@pytest.mark.parametrize(
    "host,allowed",
    [
        ("127.0.0.1:8000", True), ("localhost:8000", True), ("app.localhost", True), ("[::1]:8000", True),
        ("10.0.0.5:8000", True), ("evil.example:8000", False), ("evil.example.", False), ("127.0.0.1.evil.example", False),
        (None, True),
    ],
)
def test_keys_off_on_loopback_answers_addresses_and_localhost_only(host, allowed):
    """Bound to loopback with keys off, a rebound name (any name but localhost) is refused."""
    assert rule(host="127.0.0.1").allows(host) is allowed


def test_a_container_on_every_address_answers_any_name_unless_names_are_listed():
    """Bound to 0.0.0.0 (a container, reached by names nobody listed) any Host is answered; listed
    names restrict it, keys or not; `*` and `.domain` are understood."""
    assert rule(host="0.0.0.0").allows("csmserve.default.svc:8000")
    assert rule(host="127.0.0.1", keys=True).allows("anything.example")
    listed = rule(host="0.0.0.0", keys=True, allowed_hosts="tts.example.com,.internal")
    assert listed.allows("TTS.example.com:443") and listed.allows("a.b.internal") and listed.allows("internal")
    assert listed.allows("192.168.1.4") and not listed.allows("evil.example")
    assert rule(host="127.0.0.1", allowed_hosts="*").allows("evil.example")
