"""What one step of the model does, decided in plain data (no torch, no threads).

Every active stream is a :class:`Row` in one of ``max_batch`` slots. A row first prefills its prompt
(in chunks, so a long prompt never freezes the others), then decodes one frame per step with every
other decoding row. A request's text may be several pieces (sentence groups): at the end of a piece
the row stays in its slot and prefills the next piece's prompt, most of which (the previous piece and
its audio) the slot's cache already holds. The :class:`Scheduler` admits waiting streams into free
slots and returns a :class:`StepPlan`; the worker executes it on the model and reports back.

Prompt positions have identities (:func:`text_key`, :func:`frame_key`): a slot remembers the ones its
cache holds, and a new prompt is placed in the free slot that already holds its longest prefix.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any


def text_key(token_id: int) -> Hashable:
    """The identity of a backbone position holding a text token."""
    return ("text", int(token_id))


def frame_key(codes: Sequence[int]) -> Hashable:
    """The identity of a backbone position holding an audio frame (its codebook ids)."""
    return ("audio", tuple(int(c) for c in codes))


def common_prefix(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def is_end_of_audio(codes: Sequence[int], eos_id: int) -> bool:
    """CSM ends on a frame whose codebooks 0..N-2 are all ``codebook_eos_token_id`` (not yielded)."""
    return all(c == eos_id for c in codes[:-1])


@dataclass
class Piece:
    """One generation of a stream: a prompt of ``length`` positions (``key``: their identities, or
    ``None`` for no reuse) and at most ``max_frames`` frames. ``work`` is the model's own data."""

    length: int
    max_frames: int
    key: Sequence[Hashable] | None = None
    work: Any = None


@dataclass(eq=False)
class Row:
    """One stream in the scheduler. ``stream`` is the worker's per-request object."""

    stream: Any
    slot: int = -1
    piece: Piece | None = None
    computed: int = 0  # prompt positions of the current piece already in the slot's cache
    frames: int = 0  # frames of the current piece so far

    @property
    def prefilling(self) -> bool:
        return self.piece is not None and self.computed < self.piece.length


@dataclass
class StepPlan:
    """One step: prefill chunks ``(row, start, length)`` (``chunk`` positions in all at most), then one
    frame for each decode row."""

    prefill: list[tuple[Row, int, int]] = field(default_factory=list)
    decode: list[Row] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    """Slots, the waiting line and the plan for each step. ``chunk``: prompt positions per prefill step."""

    def __init__(self, max_batch: int, chunk: int, reuse: bool = True):
        self.max_batch = max_batch
        self.chunk = chunk
        self.reuse = reuse
        self.waiting: deque[Row] = deque()
        self.rows: list[Row] = []  # rows holding a slot, in admission order
        #: What each slot's backbone cache holds: one identity per position from 0.
        self.cached: list[list[Hashable]] = [[] for _ in range(max_batch)]
        #: Prompt positions prefilled (computed) or taken from a slot's cache (reused), running totals.
        self.prefill_positions = {"computed": 0, "reused": 0}

    def free_slots(self) -> list[int]:
        taken = {row.slot for row in self.rows}
        return [slot for slot in range(self.max_batch) if slot not in taken]

    def place(self, row: Row, piece: Piece) -> int:
        """Give ``row`` a free slot for ``piece`` (the one whose cache holds the longest prefix of its
        key; else the lowest) and return how many prompt positions it reuses."""
        free = self.free_slots()
        best, reused = free[0], 0
        if self.reuse and piece.key is not None:
            for slot in free:
                common = common_prefix(self.cached[slot], piece.key)
                if common > reused:
                    best, reused = slot, common
        row.slot = best
        self.rows.append(row)
        return self.begin(row, piece)

    def begin(self, row: Row, piece: Piece) -> int:
        """Start ``piece`` on ``row``'s slot; returns the positions taken from the cache (the last one is
        always computed: its hidden state predicts the first frame)."""
        cached = self.cached[row.slot]
        reused = 0
        if self.reuse and piece.key is not None:
            reused = min(common_prefix(cached, piece.key), piece.length - 1)
        del cached[reused:]  # positions from `reused` on are about to be overwritten
        row.piece, row.computed, row.frames = piece, reused, 0
        self.prefill_positions["reused"] += reused
        return reused

    def prefilled(self, row: Row, start: int, length: int) -> None:
        """``length`` prompt positions from ``start`` are in the cache."""
        row.computed = start + length
        self.prefill_positions["computed"] += length
        if row.piece.key is not None and len(self.cached[row.slot]) == start:
            self.cached[row.slot].extend(row.piece.key[start : start + length])
        elif row.piece.key is None:
            self.cached[row.slot].clear()

    def decoded(self, row: Row, codes: Sequence[int]) -> None:
        """``row`` made a frame; it was fed back at the next position (that position's identity is known)."""
        cached = self.cached[row.slot]
        if row.piece.key is not None and len(cached) == row.piece.length + row.frames:
            cached.append(frame_key(codes))
        row.frames += 1

    def release(self, row: Row, *, keep_cache: bool = True) -> None:
        """``row`` leaves its slot (its cache stays for prefix reuse unless ``keep_cache`` is false)."""
        if row in self.rows:
            self.rows.remove(row)
            if not keep_cache:
                self.cached[row.slot].clear()
        elif row in self.waiting:
            self.waiting.remove(row)

    def plan(self, can_decode: Callable[[Row], bool]) -> StepPlan:
        """The next step: every decoding row that ``can_decode`` (its client has room for a frame), and
        prefill chunks of the prompts waiting for it, oldest first, ``chunk`` positions in all (so the
        talking streams wait at most about one chunk's compute for their next frame)."""
        plan = StepPlan()
        budget = self.chunk
        for row in self.rows:
            if row.prefilling:
                if budget > 0:
                    length = min(budget, row.piece.length - row.computed)
                    plan.prefill.append((row, row.computed, length))
                    budget -= length
            elif row.piece is not None and can_decode(row):
                plan.decode.append(row)
        return plan
