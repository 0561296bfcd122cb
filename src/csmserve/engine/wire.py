"""The messages between an API worker and the engine process: typed, msgpack-encoded (msgspec), no pickle.

One ZeroMQ ROUTER socket in the engine process, one DEALER socket per API worker (over ``ipc://``). A
worker sends :class:`Hello` when it connects and every ``PING_S`` (so the engine can forget workers that
died), then :class:`Submit`, :class:`Cancel`, :class:`Credit` (frames its clients took, batched per
event-loop tick), :class:`Encode` and :class:`Release`. The engine answers with one :class:`Step` per
worker per step (every item for that worker's streams), a :class:`Beat` every ``BEAT_S`` (its
incarnation, what ``/health`` shows, its capacity), and :class:`Encoded`.

Requests travel as :class:`~csmserve.engine.SynthesisRequest` itself (a frozen dataclass of plain
data); numpy arrays (voice codes, context audio) as a msgpack extension holding dtype, shape and bytes.
Audio frames travel as float32 bytes.
"""

from __future__ import annotations

import struct

import msgspec
import numpy as np

from csmserve.engine import Capacity, SynthesisRequest

#: How often an API worker says it is alive, and how often the engine does (seconds).
PING_S = 0.5
BEAT_S = 0.2
#: Item kinds in a :class:`Step`.
AUDIO, END, ERROR = 0, 1, 2
_ARRAY = 1  # msgpack extension code of a numpy array


class Hello(msgspec.Struct, tag="hello"):
    worker: str


class Submit(msgspec.Struct, tag="submit"):
    stream: int
    request: SynthesisRequest


class Cancel(msgspec.Struct, tag="cancel"):
    stream: int


class Credit(msgspec.Struct, tag="credit"):
    """Frames each stream's client took since the last credit: ``(stream, frames)`` pairs."""

    grants: list[tuple[int, int]]


class Encode(msgspec.Struct, tag="encode"):
    call: int
    audio: np.ndarray


class Release(msgspec.Struct, tag="release"):
    continuation: str


class Bye(msgspec.Struct, tag="bye"):
    """The worker is leaving: cancel its streams."""


class Stop(msgspec.Struct, tag="stop"):
    """The supervisor's: stop the engine (streams in flight end with an error)."""


Inbound = Hello | Submit | Cancel | Credit | Encode | Release | Bye | Stop


class Item(msgspec.Struct, array_like=True):
    """One item of a stream: an audio frame (float32 bytes), its end, or its error (the error's class
    name in :mod:`csmserve.errors` and its message)."""

    stream: int
    kind: int
    audio: bytes = b""
    error: str = ""
    message: str = ""


class Step(msgspec.Struct, tag="step"):
    items: list[Item]
    capacity: Capacity


class Beat(msgspec.Struct, tag="beat"):
    """The engine is alive: its ``incarnation`` (a new one after every restart), state and load."""

    incarnation: int
    ready: bool
    failed: str | None
    info: dict
    sample_rate: int
    capacity: Capacity


class Encoded(msgspec.Struct, tag="encoded"):
    call: int
    codes: np.ndarray | None = None
    error: str = ""
    message: str = ""


Outbound = Step | Beat | Encoded


def _enc_hook(value):
    if isinstance(value, np.ndarray):
        value = np.ascontiguousarray(value)
        dtype = value.dtype.str.encode()
        header = struct.pack(f"<B{len(dtype)}sB{value.ndim}q", len(dtype), dtype, value.ndim, *value.shape)
        return msgspec.msgpack.Ext(_ARRAY, header + value.tobytes())
    raise NotImplementedError(f"cannot send {type(value).__name__}")


def _ext_hook(code: int, data: memoryview):
    if code != _ARRAY:
        raise ValueError(f"unknown extension {code}")
    size = data[0]
    dtype = np.dtype(bytes(data[1 : 1 + size]).decode())
    ndim = data[1 + size]
    start = 2 + size
    shape = struct.unpack_from(f"<{ndim}q", data, start)
    # A copy: the message buffer is not ours to keep.
    return np.frombuffer(data[start + 8 * ndim :], dtype=dtype).reshape(shape).copy()


def _dec_hook(kind, value):
    if kind is np.ndarray and isinstance(value, np.ndarray):
        return value
    raise NotImplementedError(f"cannot receive {kind}")


class Codec:
    """Encoders and decoders for both directions (one per thread: msgspec's are not shared)."""

    def __init__(self):
        self._encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
        self._inbound = msgspec.msgpack.Decoder(Inbound, dec_hook=_dec_hook, ext_hook=_ext_hook)
        self._outbound = msgspec.msgpack.Decoder(Outbound, dec_hook=_dec_hook, ext_hook=_ext_hook)

    def encode(self, message) -> bytes:
        return self._encoder.encode(message)

    def inbound(self, data: bytes) -> Inbound:
        return self._inbound.decode(data)

    def outbound(self, data: bytes) -> Outbound:
        return self._outbound.decode(data)


def error_item(stream: int, error: BaseException) -> Item:
    """An :data:`ERROR` item for ``error`` (a :class:`~csmserve.errors.CsmServeError` keeps its class)."""
    from csmserve.errors import CsmServeError

    name = type(error).__name__ if isinstance(error, CsmServeError) else "GenerationFailed"
    message = error.message if isinstance(error, CsmServeError) else f"generation failed: {error}"
    return Item(stream, ERROR, error=name, message=message)


def error_from(name: str, message: str) -> BaseException:
    """The :mod:`csmserve.errors` exception ``name`` with ``message`` (a generic one for unknown names)."""
    from csmserve import errors

    kind = getattr(errors, name, None)
    if not (isinstance(kind, type) and issubclass(kind, errors.CsmServeError)):
        kind = errors.GenerationFailed
    return kind(message)
