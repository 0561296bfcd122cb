"""From a validated request to what the client receives, with stats.

Engine audio (float32, 24 kHz) -> the request's encoding (PCM at a rate, µ-law, A-law; stateful, so
chunk boundaries are seamless) -> exact-size binary chunks, or telephony media messages. Shared by
the WebSocket and REST adapters, so both produce the same bytes for the same request.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import anyio
import numpy as np

from csmserve.audio.formats import make_encoder
from csmserve.audio.pcm import Chunker
from csmserve.audio.telephony import TelnyxFramer, TwilioFramer
from csmserve.config import Settings
from csmserve.engine import ContextTurn, Engine, SynthesisRequest
from csmserve.errors import DeadlineExceeded, InvalidRequest
from csmserve.protocol import GenerateRequest

#: What goes out: bytes are binary frames, str are JSON text frames (telephony media messages).
Outgoing = bytes | str


def synthesis_request(request: GenerateRequest, settings: Settings, voices=None, continuation=None) -> SynthesisRequest:
    """The engine's view of a client request: audio budget derived from the text, voice and
    context resolved. Raises :class:`InvalidRequest` for an unknown voice."""
    budget = settings.audio_budget_ms(request.text)
    if request.max_audio_ms is not None:
        budget = min(request.max_audio_ms, settings.max_audio_ms)
    voice_turns: tuple[ContextTurn, ...] = ()
    speaker_id = request.speaker_id
    if request.voice is not None:
        voice = voices.get(request.voice) if voices is not None else None
        if voice is None:
            raise InvalidRequest(f"unknown voice {request.voice!r}; list voices with GET /v1/voices")
        voice_turns = (ContextTurn(voice.speaker_id, voice.transcript, codes=voices.codes(voice.id)),)
        if "speaker_id" not in request.model_fields_set:
            speaker_id = voice.speaker_id
    context = tuple(
        ContextTurn(
            turn.speaker_id,
            turn.text,
            audio=None if turn.audio is None else np.frombuffer(turn.audio, dtype="<i2").astype(np.float32) / 32768.0,
        )
        for turn in request.context
    )
    return SynthesisRequest(
        text=request.text,
        speaker_id=speaker_id,
        max_audio_ms=budget,
        temperature=request.temperature,
        top_k=request.top_k,
        seed=request.seed,
        request_id=request.request_id,
        voice=voice_turns,
        context=context,
        continuation=continuation,
    )


@dataclass
class StreamStats:
    """Figures for the ``done`` frame. Times are seconds on the monotonic clock."""

    sample_rate: int
    started: float = field(default_factory=time.monotonic)
    first_audio: float | None = None
    samples: int = 0  # at the engine's rate
    chunks: int = 0

    def as_event_fields(self) -> dict:
        elapsed = time.monotonic() - self.started
        audio_s = self.samples / self.sample_rate
        fields = {
            "audio_ms": round(1000 * audio_s, 1),
            "samples": self.samples,
            "chunks": self.chunks,
            "elapsed_ms": round(1000 * elapsed, 1),
        }
        if self.first_audio is not None:
            fields["ttfa_ms"] = round(1000 * (self.first_audio - self.started), 1)
        if audio_s > 0:
            fields["rtf"] = round(elapsed / audio_s, 3)
        return fields


class AudioOutput:
    """Turns engine audio into the outgoing frames of one request (or one streamed-text stream).

    Binary chunks hold exactly ``chunk_ms`` of the encoded audio (the first ``first_chunk_ms``, the
    last what is left); with ``framing`` the output is the provider's JSON media messages of whole
    20 ms frames, then a mark. Not thread-safe; one per stream.
    """

    def __init__(self, request: GenerateRequest, stats: StreamStats):
        self.request = request
        self.stats = stats
        self.encoder = make_encoder(request.format, request.sample_rate)
        width = 2 if request.format == "pcm_s16le" else 1
        self.framer = None
        self.chunker = None
        if request.framing == "twilio":
            self.framer = TwilioFramer(request.stream_sid)
        elif request.framing == "telnyx":
            self.framer = TelnyxFramer()
        else:
            size = width * request.sample_rate * request.chunk_ms // 1000
            first = width * request.sample_rate * request.first_chunk_ms // 1000 if request.first_chunk_ms else None
            # Keep whole samples in every chunk.
            self.chunker = Chunker(size - size % width, first - first % width if first else None)

    def feed(self, audio: np.ndarray) -> list[Outgoing]:
        self.stats.samples += len(audio)
        return self._count(self._frame(self.encoder.encode(audio)))

    def finish(self) -> list[Outgoing]:
        out = self._frame(self.encoder.flush())
        if self.framer is not None:
            out += self.framer.end(self.request.request_id or "csmserve-end")
        else:
            tail = self.chunker.flush()
            if tail:
                out.append(tail)
        return self._count(out)

    def _frame(self, data: bytes) -> list[Outgoing]:
        if not data:
            return []
        if self.framer is not None:
            return list(self.framer.media(data))
        return list(self.chunker.push(data))

    def _count(self, items: list[Outgoing]) -> list[Outgoing]:
        if items and self.stats.first_audio is None:
            self.stats.first_audio = time.monotonic()
        self.stats.chunks += sum(1 for i in items if isinstance(i, bytes) or '"media"' in i)
        return items


async def stream_audio(engine: Engine, request: SynthesisRequest, output: AudioOutput, *, finish: bool = True) -> AsyncIterator[Outgoing]:
    """Outgoing frames for ``request`` as the engine produces audio; ``finish`` flushes the output
    at the end (a streamed-text sentence leaves it open for the next). Safe to cancel: cancelling
    the consumer cancels the engine's generation between two frames."""
    stream = engine.synthesize(request)
    try:
        async for audio in stream:
            for item in output.feed(audio):
                yield item
        if finish:
            for item in output.finish():
                yield item
    finally:
        await stream.aclose()


def deadline_exceeded(seconds: float) -> DeadlineExceeded:
    return DeadlineExceeded(f"the request did not finish within {seconds:g} s and was stopped")


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Cancel the enclosed streaming after ``seconds`` and raise :class:`DeadlineExceeded` instead.
    Never around a ``yield``: the cancel scope must be entered and left by the same task."""
    try:
        with anyio.fail_after(seconds):
            yield
    except TimeoutError:
        raise deadline_exceeded(seconds) from None
