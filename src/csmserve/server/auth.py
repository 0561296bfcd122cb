"""API keys: ``Authorization: Bearer``, ``X-API-Key`` (or ``xi-api-key``), a ``token`` query parameter, or (WebSocket) a
``token`` field in the first message. Keys are compared in constant time and never logged.

Open without a key: ``/health`` and ``/ready`` (probes), the demo page and its assets (a person
types the key into it), and ``/metrics`` unless ``protect_metrics``.

A request acts for a *tenant* (:func:`tenant_of`): its key's id (``key-1``, ``key-2``, ...: the key's
place in the configured list, never the key), or its client address when keys are off. Admission
gives each tenant its own quota of streams, and the engine shares rows and cached prompts by it.
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.requests import HTTPConnection

PUBLIC_PATHS = {"/health", "/ready", "/", "/favicon.ico"}
PUBLIC_PREFIXES = ("/static/",)


class KeyChecker:
    def __init__(self, keys):
        self._keys = [k.get_secret_value().encode() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def valid(self, candidate: str | None) -> bool:
        return self.key_id(candidate) is not None

    def key_id(self, candidate: str | None) -> str | None:
        """The id of the key ``candidate`` is (``key-<n>``, its place in the list from 1), or None."""
        if not candidate:
            return None
        given = candidate.encode()
        # Compare against every key, always, so timing says nothing about which one matched.
        results = [hmac.compare_digest(given, key) for key in self._keys]
        return next((f"key-{n}" for n, matched in enumerate(results, 1) if matched), None)


def tenant_of(conn: HTTPConnection, keys: KeyChecker) -> str:
    """Whom ``conn`` acts for: the id of the key it presents when keys are on (a WebSocket that sends
    its key in a message learns its tenant then: ``Socket.accept_key``), else its client's address
    (``client 203.0.113.7``; behind a proxy, the address uvicorn takes from ``X-Forwarded-For`` when
    the proxy's address is in ``FORWARDED_ALLOW_IPS``)."""
    if keys.enabled:
        return keys.key_id(presented_key(conn)) or "no key"
    return f"client {conn.client.host}" if conn.client else "client unknown"


def key_id(key: str) -> str:
    """A key's name in the logs: the first 8 hex digits of its SHA-256, which tells keys apart without
    revealing them (``printf %s "$KEY" | sha256sum | cut -c1-8`` gives an operator the same)."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def presented_key(conn: HTTPConnection) -> str | None:
    """The key a request carries in a header or the query string, if any."""
    auth = conn.headers.get("authorization", "")
    bearer = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    # An empty "Authorization: Bearer" (a client library's default) must not hide a real key elsewhere.
    # xi-api-key: the header of ElevenLabs' API (its SDK and the agent frameworks send it).
    return bearer or conn.headers.get("x-api-key") or conn.headers.get("xi-api-key") or conn.query_params.get("token")


def is_public(path: str, protect_metrics: bool) -> bool:
    if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
        return True
    return path == "/metrics" and not protect_metrics
