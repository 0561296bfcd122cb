"""A deterministic test engine: the real batching worker and contract, a tone instead of a model.

Used by tests (it can be slow, or fail, on demand) and by ``make load`` to measure the server alone.
Like the model, it steps every active stream together: one ``frame_delay_s`` per step, whatever the
number of streams in it. Its audio for a request is a pure function of (text, speaker_id, seed): tests
compare what a client received with :meth:`FakeEngine.render` sample for sample.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import numpy as np

from csmserve.engine import FRAME_MS, Capacity, Continuation, EngineInfo, SynthesisRequest
from csmserve.engine.scheduler import Piece, Row, SlotCopy
from csmserve.engine.worker import Frame, ModelWorker, Stream, synthesize_on


class FakeEngine:
    """Tones in 80 ms frames, one step every ``frame_delay_s``; ``fail_at_frame`` raises there."""

    sample_rate = 24_000
    frame_size = 1920

    def __init__(
        self,
        *,
        frame_delay_s: float = 0.0,
        fail_at_frame: int | None = None,
        fail_with: BaseException | None = None,
        load_delay_s: float = 0.0,
        max_queue: int = 64,
        max_batch: int = 64,
        max_lag_s: float = 10.0,
    ):
        self.frame_delay_s = frame_delay_s
        self.fail_at_frame = fail_at_frame
        #: What the injected failure raises (default RuntimeError): e.g. torch.OutOfMemoryError.
        self.fail_with = fail_with
        self.load_delay_s = load_delay_s
        self.info = EngineInfo(name="fake", model="fake-tone", offline_model=True)
        self.info.extra["max_batch"] = max_batch
        self._worker = ModelWorker(
            self, name="fake-worker", max_batch=max_batch, max_queued=max_queue, max_lag_s=max_lag_s
        )
        #: Frames computed per request id (tests check how many were made after a cancel).
        self.frames_made: dict[str | None, int] = {}
        #: Rows in each decode step so far (tests check that streams were stepped together).
        self.batch_sizes: list[int] = []
        #: ``(tenant, request_id)`` of each request given a row, in order (tests check the turns).
        self.admitted: list[tuple[str | None, str | None]] = []

    async def start(self) -> None:
        self._worker.start()
        if self.load_delay_s:
            await self._worker.call(lambda: time.sleep(self.load_delay_s))
        self.info.ready = True

    async def close(self) -> None:
        self._worker.stop()

    def capacity(self) -> Capacity:
        return self._worker.capacity()

    @property
    def worker(self) -> ModelWorker:
        """The model thread (an engine process bridges to it)."""
        return self._worker

    def num_frames(self, request: SynthesisRequest) -> int:
        return max(1, min(request.max_audio_ms // FRAME_MS, 2 + len(request.text) // 4))

    def frame(self, request: SynthesisRequest, index: int) -> np.ndarray:
        """Frame ``index`` of ``request``'s audio: float32 ``(1920,)`` in [-0.5, 0.5]."""
        seed = request.seed or 0
        freq = 110.0 * (1 + request.speaker_id) + (seed % 97) + (sum(map(ord, request.text)) % 50)
        t = (np.arange(self.frame_size) + index * self.frame_size) / self.sample_rate
        return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)

    def render(self, request: SynthesisRequest, start_frame: int = 0) -> np.ndarray:
        """The whole utterance at once (what a client must receive, before int16 conversion).

        ``start_frame``: where a continued stream's frame count stood (the tone's phase continues)."""
        count = self.num_frames(request)
        return np.concatenate([self.frame(request, start_frame + i) for i in range(count)])

    # -- the worker's StepModel: one piece per request, no prompt to prefill ---------------------------
    def next_piece(self, stream: Stream) -> Piece | None:
        if stream.state is not None:
            return None
        stream.state = stream.carry.get("phase", 0)  # where a continued stream's tone stands
        self.frames_made.setdefault(stream.request.request_id, 0)
        return Piece(length=0, max_frames=self.num_frames(stream.request))

    def enter(self, stream: Stream, slot: int) -> None:
        self.admitted.append((stream.request.tenant, stream.request.request_id))

    def start_piece(self, row: Row) -> None:
        pass

    def copy(self, copies: list[SlotCopy]) -> None:
        pass

    def prefill(self, chunks: list[tuple[Row, int, int]]) -> None:
        pass

    def decode(self, rows: list[Row]) -> list[Frame | None]:
        if self.frame_delay_s:
            time.sleep(self.frame_delay_s)
        self.batch_sizes.append(len(rows))
        frames = []
        for row in rows:
            request = row.stream.request
            if self.fail_at_frame is not None and row.frames == self.fail_at_frame:
                if self.fail_with is not None:
                    raise self.fail_with
                raise RuntimeError("injected model failure")
            self.frames_made[request.request_id] += 1
            index = row.stream.state + row.frames
            frames.append(Frame([index], self.frame(request, index)))
        return frames

    def leave(self, stream: Stream, slot: int) -> None:
        if stream.request.continuation is not None:  # where the tone's phase stands, for its next request
            stream.carry["phase"] = stream.state + stream.frames

    async def encode(self, audio: np.ndarray) -> np.ndarray:
        """Stand-in codes ``(frames, 32)``: one frame per 1920 samples, derived from the audio."""
        frames = max(1, len(audio) // self.frame_size)
        level = int(1000 * float(np.abs(audio).mean())) % 2048
        return np.full((frames, 32), level, dtype=np.int16)

    def synthesize(self, request: SynthesisRequest) -> AsyncIterator[np.ndarray]:
        return synthesize_on(self._worker, self.info, request)

    def release(self, continuation: Continuation) -> None:
        self._worker.release(continuation.id)
