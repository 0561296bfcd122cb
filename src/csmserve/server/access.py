"""One access line per streaming request, when it ends: what uvicorn's access log is for HTTP, for the
requests that live inside a WebSocket or a Wyoming connection.

A line names the route, the client, the key's id (never the key: :func:`~csmserve.server.auth.key_id`),
the voice, the characters of text, the seconds of audio sent, the time to the first audio and the
outcome (the ``csm_requests_total`` outcomes). Written on the ``csmserve.access`` logger at INFO, once
per :class:`AccessLine` however many paths reach its end; a JSON log carries the same fields under
``access``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from csmserve.logs import clean_id, redact, request_id
from csmserve.speech import StreamStats

log = logging.getLogger("csmserve.access")


@dataclass
class AccessLine:
    """One request's line. ``chars`` and ``stats`` may be filled in while it runs (a text stream's
    grow); :meth:`end` writes the line the first time it is called and never again."""

    route: str
    client: str | None = None
    key_id: str | None = None
    voice: str | None = None
    chars: int = 0
    stats: StreamStats | None = None
    #: The request's id: the line carries it as every line of the request does, wherever it is written.
    request_id: str | None = None
    written: bool = False

    def fields(self, outcome: str) -> dict:
        stats = self.stats
        audio_s = stats.samples / stats.sample_rate if stats is not None else 0.0
        first_ms = None
        if stats is not None and stats.first_audio is not None:
            first_ms = round(1000 * (stats.first_audio - stats.started), 1)
        return {
            "route": self.route,
            "request_id": clean_id(self.request_id),
            "client": self.client,
            "key_id": self.key_id,
            "voice": None if self.voice is None else redact(clean_id(self.voice)),
            "chars": self.chars,
            "audio_s": round(audio_s, 3),
            "first_audio_ms": first_ms,
            "outcome": outcome,
        }

    def end(self, outcome: str) -> None:
        """Write the line with ``outcome`` (ok, error, cancelled, rejected, disconnected, timeout), once."""
        if self.written:
            return
        self.written = True
        f = self.fields(outcome)
        first = "-" if f["first_audio_ms"] is None else f"{f['first_audio_ms']:.1f}"
        token = request_id.set(self.request_id)
        try:
            log.info(
                '%s "%s" %s key_id=%s voice=%s chars=%d audio_s=%.2f first_audio_ms=%s',
                f["client"] or "-", f["route"], outcome, f["key_id"] or "-",
                "-" if f["voice"] is None else json.dumps(f["voice"]), f["chars"], f["audio_s"], first,
                extra={"access": f},
            )
        finally:
            request_id.reset(token)
