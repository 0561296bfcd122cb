"""Simultaneous WebSocket streams against a server, as the benchmarks measure them (one place for both)."""

from __future__ import annotations

import asyncio
import itertools
import time


async def one_stream(port: int, text: str, seed: int, frames: int) -> dict:
    """One seed-protocol request of ``frames`` frames at ``chunk_ms`` 80: when its chunks arrived (seconds
    from the request), its audio seconds, the gaps between chunks, and how far it fell behind real time
    (``behind``: the most any chunk arrived after the audio before it had finished playing; ``real_time``:
    never more than 20 ms)."""
    from csmserve.client import CsmClient

    async with CsmClient(f"ws://127.0.0.1:{port}/ws/generate") as client:
        started = time.monotonic()
        await client.send({"text": text, "seed": seed, "max_audio_ms": 80 * frames, "chunk_ms": 80})
        arrivals, samples = [], 0
        async for chunk in client.receive():
            arrivals.append(time.monotonic() - started)
            samples += len(chunk) // 2
    first = arrivals[0]
    # Chunk k (80 ms each) must arrive before the k chunks before it have finished playing.
    behind = max(t - first - 0.08 * k for k, t in enumerate(arrivals))
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return {
        "ttfa": first, "end": arrivals[-1], "audio_s": samples / 24_000, "gaps": gaps, "behind": behind,
        "real_time": behind <= 0.02,
    }


async def streams_at_once(port: int, n: int, frames: int) -> list[dict]:
    """``n`` streams started together, each with its own text and seed."""
    texts = [f"Caller number {i} says hello, and a little more, to fill the prompt." for i in range(n)]
    return await asyncio.gather(*(one_stream(port, t, i, frames) for i, t in enumerate(texts)))
