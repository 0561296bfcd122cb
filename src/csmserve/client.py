"""An async client for ``/ws/generate``, used by ``csmserve say`` and the tests.

    async with CsmClient("ws://127.0.0.1:8000/ws/generate") as client:
        async for chunk in client.stream("Hello world", speaker_id=0):
            play(chunk)                  # mono s16le PCM bytes at 24 kHz
        print(client.last_done)          # {"done": true, "audio_ms": ..., "ttfa_ms": ...}
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect


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
    def __init__(self, url: str = "ws://127.0.0.1:8000/ws/generate", *, open_timeout: float = 30.0):
        self.url = url
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

    async def stream(self, text: str, speaker_id: int = 0, **options: Any) -> AsyncIterator[bytes]:
        """Send one request and yield its PCM chunks; raise :class:`ServerError` on an error frame."""
        await self.send({"text": text, "speaker_id": speaker_id, **options})
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

    async def synthesize(self, text: str, speaker_id: int = 0, **options: Any) -> Result:
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
