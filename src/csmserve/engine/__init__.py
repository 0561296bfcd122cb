"""The model side, behind one small contract the server relies on.

An engine has ``sample_rate``, ``info``, ``start()``/``close()`` and ``synthesize(request)``, an
async iterator of mono float32 audio pieces at ``sample_rate``. Chunking, encoding, framing and
metrics stay outside. This module never imports torch; :func:`create_engine` imports the engine
that was chosen.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from csmserve.config import Settings


#: One frame of CSM's audio (Mimi's frame rate: 12.5 frames per second).
FRAME_MS = 80


@dataclass(frozen=True)
class ContextTurn:
    """An earlier turn of the conversation, given to CSM as context for prosody and voice.

    ``codes``: Mimi codes ``(frames, 32)`` (a stored voice); ``audio``: mono float32 at 24 kHz (a
    client's turn, encoded by the engine). Neither: text-only context.
    """

    speaker_id: int
    text: str
    codes: np.ndarray | None = None
    audio: np.ndarray | None = None


@dataclass(frozen=True)
class Continuation:
    """Names one audio stream spoken in several requests (text streamed sentence by sentence), so the
    sentences sound like one voice and join without a seam.

    Plain data: what carries over (the previous sentence as context, the codec's streaming state) stays
    inside the engine under ``id``, wherever the engine runs. The stream's owner calls
    :meth:`Engine.release` when the stream ends; an engine also forgets the least recently used ones
    beyond a bound, so a stream that vanishes without releasing costs nothing for long."""

    id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class SynthesisRequest:
    """What the engine needs for one utterance (already validated by the protocol layer).

    ``voice`` turns come first and are kept; ``context`` turns follow and are trimmed oldest-first
    when the model's window is short. Long ``text`` is generated sentence group by sentence group,
    each with the previous one as context, as one continuous stream.

    ``tenant`` names whoever the request acts for (an API key's id, or a client address when keys are
    off; ``None``: the server itself, e.g. its warm-up). The engine gives waiting tenants free rows in
    turn, and never lets one tenant's prompt reuse another's cached positions (its text and context;
    a registered voice's positions are shared by every tenant that uses the voice).
    """

    text: str
    speaker_id: int = 0
    max_audio_ms: int = 10_000
    temperature: float | None = None
    top_k: int | None = None
    seed: int | None = None
    request_id: str | None = None
    voice: tuple[ContextTurn, ...] = ()
    context: tuple[ContextTurn, ...] = ()
    continuation: Continuation | None = None
    tenant: str | None = None


@dataclass
class EngineInfo:
    """What ``/health`` and the start-up log say about the model."""

    name: str
    model: str
    device: str = "cpu"
    dtype: str = "float32"
    offline_model: bool = False
    ready: bool = False
    failed: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Capacity:
    """A snapshot of the engine's work, for admission, ``/health``, ``/metrics`` and the watchdog.

    ``max_batch``: rows (streams) one step can hold; ``active``: rows generating now; ``waiting``:
    requests submitted but not yet generating (queued, or being prefilled); ``steps``: steps run
    since start, monotonic (the watchdog's progress signal: waiting work and no new steps means the
    engine is stuck); ``last_step_ms`` and ``last_batch``: the duration and row count of the last step;
    ``last_step_cpu_ms``: the model thread's CPU time in it, ``last_step_device_ms``: the device's (a
    GPU's; ``None`` elsewhere): wall time well above both is time lost waiting for the interpreter
    lock. ``realtime_streams``: how many streams this device holds in real time (the largest step
    size whose step, measured at start-up, takes less than a frame of audio), ``None`` until measured.
    """

    max_batch: int
    active: int = 0
    waiting: int = 0
    steps: int = 0
    last_step_ms: float = 0.0
    last_batch: int = 0
    last_step_cpu_ms: float = 0.0
    last_step_device_ms: float | None = None
    realtime_streams: int | None = None

    @property
    def free_slots(self) -> int:
        return max(0, self.max_batch - self.active)


class Engine(Protocol):
    sample_rate: int
    info: EngineInfo

    def capacity(self) -> Capacity:
        """What the engine is doing now (safe to call from the event loop at any time)."""

    async def start(self) -> None:
        """Load and warm up. Returns when the engine can synthesise (or raises ModelLoadError)."""

    async def close(self) -> None:
        """Stop the worker and free the model."""

    async def encode(self, audio: np.ndarray) -> np.ndarray:
        """Codec codes ``(frames, 32)`` for mono float32 audio at ``sample_rate`` (voices)."""

    def release(self, continuation: Continuation) -> None:
        """Forget what ``continuation``'s stream carried (it ended). Safe to call from the event loop,
        more than once, and for a continuation the engine never saw."""

    def synthesize(self, request: SynthesisRequest) -> AsyncIterator[np.ndarray]:
        """Audio for ``request`` as float32 mono pieces at ``sample_rate``, each yielded as soon as
        it exists. Safe to cancel: closing the iterator (or cancelling the task iterating it) stops
        generation between two frames."""


def create_engine(settings: Settings) -> Engine:
    """The engine ``settings`` ask for, not yet started: in this process, in an engine process of its own
    (one per GPU), or the engine process an API worker connects to (``engine_address``)."""
    if settings.engine_address:
        from csmserve.engine.client import EngineClient, EngineGroup

        clients = [EngineClient(settings, address) for address in settings.engine_address.split(",")]
        return clients[0] if len(clients) == 1 else EngineGroup(clients)
    if not settings.uses_engine_process():
        return create_local_engine(settings)
    from csmserve.engine.client import EngineGroup, ProcessEngine

    devices = engine_devices(settings)
    if len(devices) == 1:
        return ProcessEngine(settings, device=devices[0])
    return EngineGroup([ProcessEngine(settings, device=device) for device in devices])


def engine_devices(settings: Settings) -> list[str | None]:
    """The GPUs to run one engine process each on, as ``CUDA_VISIBLE_DEVICES`` values (``[None]``: one
    engine that sees what this process sees: one GPU, a CPU). Entries of this process's own
    ``CUDA_VISIBLE_DEVICES`` (a scheduler's, such as Ray's) are kept: index 0 means its first GPU."""
    import os

    count = settings.gpus
    if count is None:
        if settings.engine != "csm":
            return [None]
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else [str(i) for i in range(count)]
    ids = ids[:count]
    return ids if len(ids) > 1 else [None]


def create_local_engine(settings: Settings) -> Engine:
    """The engine ``settings.engine`` names, in this process (its model thread beside the event loop)."""
    if settings.engine == "fake":
        from csmserve.engine.fake import FakeEngine

        max_batch = settings.max_batch or 64
        return FakeEngine(
            frame_delay_s=settings.fake_frame_delay_ms / 1000,
            max_queue=settings.resolved_max_queue(max_batch),
            max_batch=max_batch,
            max_lag_s=settings.max_lag_s,
        )
    from csmserve.engine.csm import CsmEngine

    return CsmEngine(settings)
