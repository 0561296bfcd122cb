"""An async client for ``/ws/generate``, used by ``csmserve say`` and the tests.

    async with CsmClient("ws://127.0.0.1:8000/ws/generate") as client:
        async for chunk in client.stream("Hello world", speaker_id=0):
            play(chunk)                  # mono s16le PCM bytes at 24 kHz
        print(client.last_done)          # {"done": true, "audio_ms": ..., "ttfa_ms": ...}

Without a URL it connects where ``csmserve serve`` listens with the same environment
(:func:`server_url`: ``CSM_HOST`` and ``CSM_PORT``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from csmserve.config import Settings

#: Listen addresses that mean "every interface": a client reaches such a server on loopback.
_ANY_ADDRESS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1", "[::]": "::1"}


def server_url(environ: Mapping[str, str] = os.environ) -> str:
    """The ``/ws/generate`` URL of the server that ``csmserve serve`` would start with ``environ``.

    Reads only ``CSM_HOST`` and ``CSM_PORT`` (a client must not fail on the server's other settings),
    with the same defaults as :class:`~csmserve.config.Settings`. A wildcard listen address (``0.0.0.0``,
    ``::``) becomes loopback. Raises ``ValueError`` when ``CSM_PORT`` is not a port a client can reach.
    """
    host = environ.get("CSM_HOST", Settings.model_fields["host"].default).strip()
    host = _ANY_ADDRESS.get(host, host)
    raw_port = environ.get("CSM_PORT", str(Settings.model_fields["port"].default)).strip()
    if not raw_port.isdigit() or not 0 < int(raw_port) < 65536:
        raise ValueError(
            f"CSM_PORT={raw_port!r} is not a port a client can connect to (1-65535); "
            "set it to the server's port or pass --url"
        )
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal in a URL
    return f"ws://{host}:{int(raw_port)}/ws/generate"


class ServerError(Exception):
    """The server ended a request with an error frame."""

    def __init__(self, event: dict):
        error = event.get("error") or {}
        super().__init__(f"{error.get('code', 'error')}: {error.get('message', event)}")
        self.code = error.get("code")
        self.event = event


@dataclass
class Result:
    """A whole utterance: PCM bytes, its chunks' sizes, the ``done`` frame and client-side timing."""

    pcm: bytes
    chunk_sizes: list[int]
    done: dict
    ttfa_s: float | None = None
    extra: dict = field(default_factory=dict)


class CsmClient:
    def __init__(self, url: str | None = None, *, open_timeout: float = 30.0):
        """``url``: the server's ``/ws/generate``; ``None``: :func:`server_url` (``CSM_HOST``/``CSM_PORT``)."""
        self.url = url if url is not None else server_url()
        self.open_timeout = open_timeout
        self.ws: ClientConnection | None = None
        self.last_done: dict | None = None

    async def __aenter__(self) -> CsmClient:
        self.ws = await connect(self.url, compression=None, max_size=None, open_timeout=self.open_timeout)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self.ws is not None:
            await self.ws.close()

    async def send(self, message: dict) -> None:
        await self.ws.send(json.dumps(message))

    async def stream(self, text: str, speaker_id: int | None = 0, **options: Any) -> AsyncIterator[bytes]:
        """Send one request and yield its PCM chunks; raise :class:`ServerError` on an error frame.
        ``speaker_id`` None: not sent (a voice's own speaker, or the server's default voice)."""
        speaker = {} if speaker_id is None else {"speaker_id": speaker_id}
        await self.send({"text": text, **speaker, **options})
        async for chunk in self.receive():
            yield chunk

    async def receive(self) -> AsyncIterator[bytes]:
        """Yield binary frames until the next ``done`` frame (kept in :attr:`last_done`)."""
        while True:
            message = await self.ws.recv()
            if isinstance(message, bytes):
                yield message
                continue
            event = json.loads(message)
            if event.get("done"):
                self.last_done = event
                if "error" in event:
                    raise ServerError(event)
                return

    async def synthesize(self, text: str, speaker_id: int | None = 0, **options: Any) -> Result:
        """The whole utterance, with the client-side time to first audio."""
        started = time.monotonic()
        first = None
        pcm, sizes = bytearray(), []
        async for chunk in self.stream(text, speaker_id, **options):
            if first is None:
                first = time.monotonic() - started
            pcm += chunk
            sizes.append(len(chunk))
        return Result(bytes(pcm), sizes, self.last_done or {}, first)
