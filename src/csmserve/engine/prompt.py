"""CSM prompts with conversational context: earlier turns (text and, optionally, their audio) first.

The layout is the one ``CsmProcessor.apply_chat_template`` produces and the model was trained on:

    for each context turn:  <bos>[speaker]text<eos> <audio frame> x n <audio_eos frame>
    then the target turn:   <bos>[speaker]text<eos>

Audio frames enter the backbone as the sum of their 32 codebook embeddings; ``<audio_eos>`` is the
all-``codebook_eos_token_id`` frame. Context is trimmed oldest-first so that prompt plus the audio
still to generate fit the model's position window.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Turn:
    """One context turn: who said what, and the Mimi codes ``(frames, 32)`` of how it sounded (optional)."""

    speaker_id: int
    text: str
    codes: np.ndarray | None = None

    @property
    def has_audio(self) -> bool:
        return self.codes is not None and len(self.codes) > 0

    def positions(self, text_tokens: int) -> int:
        frames = len(self.codes) + 1 if self.has_audio else 0  # + the audio_eos frame
        return text_tokens + frames


class PromptBuilder:
    """Builds backbone input embeddings ``(1, T, hidden)`` for a target turn and its context."""

    def __init__(self, tokenizer, frames):
        """``tokenizer``: the processor's tokenizer (adds BOS/EOS); ``frames``: a FrameGenerator.
        One builder per request: it remembers the token ids of the turns it has seen."""
        self.tokenizer = tokenizer
        self.frames = frames
        self._ids: dict[tuple[int, str], torch.Tensor] = {}

    def token_ids(self, speaker_id: int, text: str) -> torch.Tensor:
        key = (speaker_id, text)
        if key not in self._ids:  # fitting and embedding ask for the same turns again
            self._ids[key] = self.tokenizer(f"[{speaker_id}]{text}", add_special_tokens=True, return_tensors="pt")[
                "input_ids"
            ]
        return self._ids[key]

    def positions(self, turn: Turn) -> int:
        """Backbone positions ``turn`` takes in a prompt: its text tokens, then its audio frames."""
        return turn.positions(self.token_ids(turn.speaker_id, turn.text).shape[1])

    def fit(self, context: Sequence[Turn], target_positions: int, reserve: int, window: int) -> list[Turn]:
        """The newest turns of ``context`` whose positions fit ``window - target_positions - reserve``."""
        budget = window - target_positions - reserve
        kept: list[Turn] = []
        for turn in reversed(context):
            need = self.positions(turn)
            if need > budget:
                break
            kept.append(turn)
            budget -= need
        return kept[::-1]

    def _parts(self, context: Sequence[Turn], speaker_id: int, text: str) -> Iterator[tuple[int, str, torch.Tensor]]:
        """The prompt in order: ``(turn, "text", ids (1, T))`` and ``(turn, "audio", codes (F, N))``, a
        turn's audio ending with its ``<audio_eos>`` frame; ``turn`` indexes ``context`` (the target
        turn: ``len(context)``). :meth:`embeddings` and :meth:`key` both read this."""
        eos_frame = torch.full((1, self.frames.num_codebooks), self.frames.eos_id, dtype=torch.long)
        for index, turn in enumerate(context):
            yield index, "text", self.token_ids(turn.speaker_id, turn.text)
            if turn.has_audio:
                yield index, "audio", torch.cat([torch.as_tensor(np.asarray(turn.codes), dtype=torch.long), eos_frame])
        yield len(context), "text", self.token_ids(speaker_id, text)

    def key(
        self, context: Sequence[Turn], speaker_id: int, text: str, owner: Hashable = None, shared: int = 0
    ) -> list:
        """One identity per position of :meth:`embeddings`' prompt, for the frame loop's prefix reuse.

        The positions belong to ``owner`` (a tenant: a prompt reuses only its own owner's positions),
        except those of the first ``shared`` turns of ``context`` (a registered voice: the same for
        every tenant), which belong to nobody and may be reused by anyone."""
        from csmserve.engine.frames import frame_key, text_key

        key = []
        for turn, kind, values in self._parts(context, speaker_id, text):
            whose = None if turn < shared else owner
            if kind == "text":
                key.extend(text_key(i, whose) for i in values[0].tolist())
            else:
                key.extend(frame_key(row, whose) for row in values.tolist())
        return key

    def embeddings(self, context: Sequence[Turn], speaker_id: int, text: str) -> torch.Tensor:
        parts = [
            self.frames.embed_text(values) if kind == "text" else self.frames.embed_frames(values)
            for _, kind, values in self._parts(context, speaker_id, text)
        ]
        return torch.cat(parts, dim=1)
