"""The hostile clients `bench/load.py --hostile N` runs beside the measured ones, all with one key.

Per streaming route (``tests/support/routes.py``), N of each of:

* a *non-reader*: a long request, then nothing read (the server must cut it after ``max_lag_s``);
* a *goer*: a request, gone 0.2 s later (the server must cancel it).

And N of each of:

* a *context hog*: an ElevenLabs multi-stream-input socket that opens a context, flushes a long text
  and closes the context, again and again (closed contexts used to stop counting while they spoke);
* a *cancel storm*: ``/ws/generate`` requests whose client disconnects right after sending them
  (cancelled requests used to keep their place in the engine's queue).

Each runs until cancelled; errors and refusals are what it expects and are not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from urllib.parse import urlsplit

import websockets
from websockets.asyncio.client import connect

from support.routes import ELEVENLABS_TTS, STREAMING_ROUTES  # bench/load.py puts tests/ on the path

#: What the hostile clients catch and shrug off: the server refusing or closing them is the point.
EXPECTED = (OSError, websockets.WebSocketException, TimeoutError)


def tasks(url: str, n: int, key: str | None, text: str, lag_s: float) -> list[asyncio.Task]:
    """Start every hostile client against the server of ``url`` (its ``/ws/generate``)."""
    per_route = [raw_client(url, route, i, key, text, lag_s) for route in STREAMING_ROUTES for i in range(n)]
    return [
        asyncio.create_task(coro)
        for coro in [
            *per_route,
            *(context_hog(url, key, text) for _ in range(n)),
            *(cancel_storm(url, key, text) for _ in range(n)),
        ]
    ]


def headers(key: str | None) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


async def raw_client(url: str, route, n: int, key: str | None, text: str, lag_s: float) -> None:
    """On ``route``: a long request never read, and one that goes away mid-stream; again and again."""
    port = urlsplit(url).port
    loop = asyncio.get_running_loop()
    while True:
        stuck = gone = None
        try:
            stuck = await loop.run_in_executor(
                None, route.open, port, text * 20, f"hostile-{route.name}-{n}", 4096, key
            )
            gone = await loop.run_in_executor(
                None, route.open, port, text, f"gone-{route.name}-{n}", 1 << 20, key
            )
            await asyncio.sleep(0.2)
            gone.close()
            await asyncio.sleep(2 * lag_s)
        except EXPECTED:
            await asyncio.sleep(0.1)
        finally:
            for sock in (stuck, gone):
                if sock is not None:
                    sock.close()


async def context_hog(url: str, key: str | None, text: str) -> None:
    """One multi-stream-input socket: open, flush, close a context, over and over, reading what comes."""
    parts = urlsplit(url)
    hog_url = f"ws://{parts.netloc}{ELEVENLABS_TTS}/multi-stream-input?output_format=pcm_24000"
    number = 0
    while True:
        try:
            async with connect(hog_url, additional_headers=headers(key), max_size=None) as ws:
                reader = asyncio.create_task(drain(ws))
                try:
                    while not reader.done():
                        cid = f"hog-{number}"
                        number += 1
                        await ws.send(json.dumps({"text": text, "context_id": cid, "flush": True}))
                        await ws.send(json.dumps({"context_id": cid, "close_context": True}))
                        await asyncio.sleep(0.01)
                finally:
                    reader.cancel()
                    with contextlib.suppress(BaseException):
                        await reader
        except EXPECTED:
            await asyncio.sleep(0.1)


async def drain(ws) -> None:
    async for _ in ws:
        pass


async def cancel_storm(url: str, key: str | None, text: str) -> None:
    """Request, then disconnect at once, over and over."""
    number = 0
    while True:
        try:
            async with connect(url, additional_headers=headers(key)) as ws:
                await ws.send(json.dumps({"text": text, "request_id": f"storm-{number}"}))
            number += 1
        except EXPECTED:
            await asyncio.sleep(0.1)
