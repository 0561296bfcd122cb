"""Where one stream's audio goes: engine audio in, what the client receives out, with its figures.

An :class:`AudioSink` is an encoder (PCM at a rate, G.711, a container; stateful, so chunk boundaries
are seamless) followed by a packer that decides how encoded bytes leave: as they come
(:class:`AsEncoded`), in exact-size chunks (:class:`InChunks`), or as a telephony provider's JSON
media messages (:class:`AsCallMessages`). Every API builds its sink from its own output options;
the speech layer only feeds it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from csmserve.audio.formats import AudioEncoder
from csmserve.audio.pcm import Chunker
from csmserve.audio.telephony import CallFramer

#: What goes out: bytes are binary frames (or body bytes), str are JSON text frames (media messages).
Outgoing = bytes | str


@dataclass
class StreamStats:
    """Figures for a ``done`` frame and the metrics. Times are seconds on the monotonic clock."""

    sample_rate: int
    started: float = field(default_factory=time.monotonic)
    first_audio: float | None = None
    samples: int = 0  # at the engine's rate
    chunks: int = 0
    #: Bytes the encoder produced (before framing): a raw format's samples at its own rate, times its width.
    encoded_bytes: int = 0

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


class Packer(Protocol):
    """How encoded bytes leave. ``push`` takes a non-empty piece; ``cut`` releases what is held back
    while the stream goes on (a sentence end); ``end`` releases the rest when it is over."""

    def push(self, data: bytes) -> list[Outgoing]: ...

    def cut(self) -> list[Outgoing]: ...

    def end(self) -> list[Outgoing]: ...


class AsEncoded:
    """The encoder's bytes as they come (a container stream, or a whole file's bytes at the end)."""

    def push(self, data: bytes) -> list[Outgoing]:
        return [data]

    def cut(self) -> list[Outgoing]:
        return []

    def end(self) -> list[Outgoing]:
        return []


class InChunks:
    """Chunks of exactly ``chunk_bytes`` (the first ``first_chunk_bytes``), the last what is left."""

    def __init__(self, chunk_bytes: int, first_chunk_bytes: int | None = None):
        self._chunker = Chunker(chunk_bytes, first_chunk_bytes)

    def push(self, data: bytes) -> list[Outgoing]:
        return list(self._chunker.push(data))

    def cut(self) -> list[Outgoing]:
        tail = self._chunker.flush()
        return [tail] if tail else []

    def end(self) -> list[Outgoing]:
        return self.cut()


class AsCallMessages:
    """A telephony provider's JSON media messages of whole 20 ms frames, then a mark named ``mark``."""

    def __init__(self, framer: CallFramer, mark: str):
        self.framer, self.mark = framer, mark

    def push(self, data: bytes) -> list[Outgoing]:
        return list(self.framer.media(data))

    def cut(self) -> list[Outgoing]:
        return []

    def end(self) -> list[Outgoing]:
        return list(self.framer.end(self.mark))


class AudioSink:
    """Engine audio (mono float32 at the engine's rate) -> ``encoder`` -> ``packer`` -> outgoing items,
    counted in ``stats`` (samples fed, first audio out, chunks out). One per stream; not thread-safe."""

    def __init__(self, encoder: AudioEncoder, stats: StreamStats, packer: Packer | None = None):
        self.encoder = encoder
        self.stats = stats
        self.packer = packer if packer is not None else AsEncoded()

    @property
    def media_type(self) -> str:
        return self.encoder.media_type

    def feed(self, audio: np.ndarray) -> list[Outgoing]:
        self.stats.samples += len(audio)
        return self._count(self._pack(self.encoder.encode(audio)))

    def cut(self) -> list[Outgoing]:
        """What is held back, released at a sentence end; the encoder's state carries on."""
        return self._count(self.packer.cut())

    def finish(self) -> list[Outgoing]:
        """Everything left (the encoder's tail, the last partial chunk, a closing mark); the stream is over."""
        return self._count(self._pack(self.encoder.flush()) + self.packer.end())

    def _pack(self, data: bytes) -> list[Outgoing]:
        self.stats.encoded_bytes += len(data)
        return self.packer.push(data) if data else []

    def _count(self, items: list[Outgoing]) -> list[Outgoing]:
        if items and self.stats.first_audio is None:
            self.stats.first_audio = time.monotonic()
        self.stats.chunks += sum(1 for i in items if isinstance(i, bytes) or '"media"' in i)
        return items
