"""From a validated request to PCM chunks: engine audio -> int16 -> exact-size chunks, with stats.

Shared by the WebSocket and REST adapters, so both produce the same bytes for the same request.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from csmserve.audio.pcm import Chunker, float_to_pcm16, samples_for_ms
from csmserve.config import Settings
from csmserve.engine import Engine, SynthesisRequest
from csmserve.protocol import GenerateRequest


def synthesis_request(request: GenerateRequest, settings: Settings) -> SynthesisRequest:
    """The engine's view of a client request, with the audio budget derived from the text."""
    budget = settings.audio_budget_ms(request.text)
    if request.max_audio_ms is not None:
        budget = min(request.max_audio_ms, settings.max_audio_ms)
    return SynthesisRequest(
        text=request.text,
        speaker_id=request.speaker_id,
        max_audio_ms=budget,
        temperature=request.temperature,
        top_k=request.top_k,
        seed=request.seed,
        request_id=request.request_id,
    )


@dataclass
class StreamStats:
    """Figures for the ``done`` frame. Times are seconds on the monotonic clock."""

    sample_rate: int
    started: float = field(default_factory=time.monotonic)
    first_audio: float | None = None
    samples: int = 0
    chunks: int = 0

    def as_event_fields(self) -> dict:
        elapsed = time.monotonic() - self.started
        audio_s = self.samples / self.sample_rate
        fields = {
            "audio_ms": round(1000 * audio_s, 1),
            "samples": self.samples,
            "chunks": self.chunks,
            "sample_rate": self.sample_rate,
            "elapsed_ms": round(1000 * elapsed, 1),
        }
        if self.first_audio is not None:
            fields["ttfa_ms"] = round(1000 * (self.first_audio - self.started), 1)
        if audio_s > 0:
            fields["rtf"] = round(elapsed / audio_s, 3)
        return fields


async def pcm_chunks(
    engine: Engine,
    request: SynthesisRequest,
    chunk_ms: int,
    first_chunk_ms: int | None,
    stats: StreamStats,
) -> AsyncIterator[bytes]:
    """Yield mono s16le chunks of ``chunk_ms`` (the first of ``first_chunk_ms``, the last shorter).

    Safe to cancel: cancelling the consumer cancels the engine's generation between two frames.
    """
    rate = engine.sample_rate
    chunker = Chunker(samples_for_ms(chunk_ms, rate), samples_for_ms(first_chunk_ms, rate) if first_chunk_ms else None)
    stream = engine.synthesize(request)
    try:
        async for audio in stream:
            for chunk in chunker.push(float_to_pcm16(audio)):
                yield _count(chunk, stats)
        tail = chunker.flush()
        if tail:
            yield _count(tail, stats)
    finally:
        await stream.aclose()


def _count(chunk: bytes, stats: StreamStats) -> bytes:
    if stats.first_audio is None:
        stats.first_audio = time.monotonic()
    stats.samples += len(chunk) // 2
    stats.chunks += 1
    return chunk
