"""API keys: ``Authorization: Bearer``, ``X-API-Key`` (or ``xi-api-key``), a ``token`` query parameter, or (WebSocket) a
``token`` field in the first message. Keys are compared in constant time and never logged.

Open without a key: ``/health`` and ``/ready`` (probes), the demo page and its assets (a person
types the key into it), and ``/metrics`` unless ``protect_metrics``.
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
        if not candidate:
            return False
        given = candidate.encode()
        # Compare against every key, always, so timing says nothing about which one matched.
        results = [hmac.compare_digest(given, key) for key in self._keys]
        return any(results)


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
