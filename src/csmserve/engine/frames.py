"""CSM's frame loop for one stream: one 80 ms frame of 32 codebook ids at a time, yielded as soon as it exists.

Per frame: the 1B backbone reads the previous frame and predicts codebook 0; the depth decoder,
seeded with the backbone's last hidden state, predicts codebooks 1..31 one after another. This is the
batched :class:`~csmserve.engine.runner.BatchRunner` driven for a single row: the solo reference the
scheduler's batches are compared with, and the loop the benchmarks time against ``generate``.

Matches ``CsmForConditionalGeneration.generate``: greedy codes are equal token for token (tests),
sampling applies temperature then top-k to float32 logits, and generation ends on a frame whose
codebooks 0..30 are all ``codebook_eos_token_id`` (that frame is not yielded). Ids the codec cannot
decode (>= its codebook size, e.g. the padding id 2050) are never sampled, whatever the weights.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence

import torch

from csmserve.engine.runner import GREEDY, BatchRunner, RowSampling, Sampling
from csmserve.engine.scheduler import Piece, Row, Scheduler, frame_key, text_key

__all__ = ["GREEDY", "FrameGenerator", "Sampling", "frame_key", "text_key"]


class FrameGenerator:
    """Generates audio frames for one request at a time over a loaded ``CsmForConditionalGeneration``.

    A one-slot :class:`BatchRunner` (caches allocated once) and a one-slot
    :class:`~csmserve.engine.scheduler.Scheduler` that remembers what the cache holds, for prefix reuse
    (the same bookkeeping the batching worker uses). Not thread-safe: one owner.
    """

    def __init__(self, model, compile: bool = False, backend: str = "inductor"):
        self.runner = BatchRunner(model, slots=1, compile=compile, backend=backend)
        runner = self.runner
        self.model, self.device, self.dtype = model, runner.device, runner.dtype
        self.num_codebooks, self.eos_id = runner.num_codebooks, runner.eos_id
        self.max_positions, self.compiled = runner.max_positions, compile
        self.embed_text, self.embed_frames = runner.embed_text, runner.embed_frames
        self._slot = Scheduler(max_batch=1, chunk=self.max_positions)
        self.reused_positions = 0  # of the last prompt, taken from the cache instead of recomputed

    @property
    def prefill_positions(self) -> dict[str, int]:
        """Prompt positions ``computed`` and ``reused`` so far (running totals, for metrics)."""
        return self._slot.prefill_positions

    @torch.inference_mode()
    def frames(
        self,
        prompt_embeds: torch.Tensor,
        max_frames: int,
        *,
        temperature: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        greedy: bool = False,
        prompt_key: Sequence[Hashable] | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield each frame's codes as a CPU ``LongTensor`` of shape ``(num_codebooks,)``.

        ``prompt_embeds``: ``(1, T, hidden)`` from :meth:`embed_text` (and, for context, frames).
        Stops at end-of-audio, after ``max_frames`` frames, or when the context window is full.
        Closing the iterator between two frames stops the work there.

        ``prompt_key``: one identity per prompt position (:func:`text_key`, :func:`frame_key`), which
        turns on prefix reuse: positions whose identities match what the backbone cache already holds
        from position 0 (the last prompt and the frames generated after it) are not computed again.
        """
        length = prompt_embeds.shape[1]
        if length >= self.max_positions:
            raise ValueError(f"prompt of {length} positions leaves no room in the {self.max_positions} window")
        if prompt_key is not None and len(prompt_key) != length:
            raise ValueError(f"prompt_key has {len(prompt_key)} identities for {length} positions")
        max_frames = min(max_frames, self.max_positions - length)
        sampling = RowSampling.create(
            self.runner.defaults, temperature=temperature, top_k=top_k, seed=seed, greedy=greedy
        )
        row = Row(stream=None)
        # Positions the cache already holds are not computed again (the last one always is).
        reuse = self.reused_positions = self._slot.place(row, Piece(length, max_frames, prompt_key))
        self.runner.start(0, sampling)
        try:
            self.runner.prefill([(0, reuse, prompt_embeds[0, reuse:])])
            self._slot.prefilled(row, reuse, length - reuse)
            for frame in range(max_frames):
                # The step reads the new frame back at its position: the cache then holds it.
                out = self.runner.decode([(0, length + frame, frame)])
                if out.eos[0]:
                    return
                codes = torch.from_numpy(out.codes[0].copy())
                self._slot.decoded(row, codes.tolist())
                yield codes
        finally:
            self._slot.release(row)
