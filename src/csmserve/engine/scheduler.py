"""What one step of the model does, decided in plain data (no torch, no threads).

Every active stream is a :class:`Row` in one of ``max_batch`` slots. A row first prefills its prompt
(in chunks, so a long prompt never freezes the others), then decodes one frame per step with every
other decoding row. A request's text may be several pieces (sentence groups): at the end of a piece
the row stays in its slot and prefills the next piece's prompt, most of which (the previous piece and
its audio) the slot's cache already holds. The :class:`Scheduler` admits waiting streams into free
slots and returns a :class:`StepPlan`; the worker executes it on the model and reports back.

Prompt positions have identities (:func:`text_key`, :func:`frame_key`): a slot remembers the ones its
cache holds. An identity names its owner (the tenant whose text or audio it is; ``None``: shared, a
registered voice), so a prompt reuses only its own tenant's positions and the shared ones: how much of
a prompt is reused never depends on another tenant's text. A new row always takes the lowest free slot,
and the longest prefix of its prompt that any slot holds (a voice's reference clip, a text stream's
previous sentence) is copied there instead of computed again. Busy rows stay packed at the bottom: when a leaving row leaves a hole and the step's
batch-size bucket would shrink, the highest row moves down into it (a :class:`SlotCopy` in the plan), so
the step's size follows the number of busy rows, not the slot number one of them happens to hold; the
prefix the hole held moves up into the slot the row left (through a spare slot, index ``max_batch``,
that the runner keeps for that), so packing never loses a cached prefix.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any


def text_key(token_id: int, owner: Hashable = None) -> Hashable:
    """The identity of a backbone position holding a text token of ``owner`` (``None``: shared by all)."""
    return ("text", owner, int(token_id))


def frame_key(codes: Sequence[int], owner: Hashable = None) -> Hashable:
    """The identity of a backbone position holding an audio frame (its codebook ids) of ``owner``."""
    return ("audio", owner, tuple(map(int, codes)))


def common_prefix(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


#: Batch sizes a step is built for (one captured graph each on a GPU); rows in between use the next one up.
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def buckets_for(slots: int) -> list[int]:
    """The step sizes for ``slots`` slots: every bucket below it, and ``slots`` itself."""
    return [size for size in BUCKETS if size < slots] + [slots]


def bucket(rows: int, slots: int) -> int:
    """The smallest step size of a ``slots``-slot engine that holds slots ``0 .. rows-1``."""
    for size in buckets_for(slots):
        if size >= rows:
            return size
    return slots


@dataclass
class Piece:
    """One generation of a stream: a prompt of ``length`` positions (``key``: their identities, or
    ``None`` for no reuse) and at most ``max_frames`` frames, whose positions belong to ``owner`` (the
    request's tenant). ``work`` is the model's own data."""

    length: int
    max_frames: int
    key: Sequence[Hashable] | None = None
    work: Any = None
    owner: Hashable = None


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

    @property
    def extent(self) -> int:
        """Backbone positions of the slot this row has written: its prompt so far, then its frames."""
        if self.piece is None:
            return 0
        return self.computed if self.prefilling else self.piece.length + self.frames


@dataclass(frozen=True)
class SlotCopy:
    """Before the step: copy positions ``0 .. positions-1`` of slot ``src`` into slot ``dst``. ``row`` set:
    that stream moves from ``src`` to ``dst`` (its hidden, sampling and codec state go with it)."""

    src: int
    dst: int
    positions: int
    row: Row | None = None


@dataclass
class StepPlan:
    """One step, decided up front: slot copies, prefill chunks ``(row, start, length)`` (``chunk`` positions
    in all at most), then one frame for each decode row (including rows whose prompt completes in this
    step: their first frame comes in the same step)."""

    copies: list[SlotCopy] = field(default_factory=list)
    prefill: list[tuple[Row, int, int]] = field(default_factory=list)
    decode: list[Row] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.copies and not self.prefill and not self.decode


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
        #: The spare slot (index ``max_batch``) exists in the runner's cache only: never placed, never reused.
        #: Prompt positions prefilled (computed) or taken from a slot's cache (reused), running totals.
        self.prefill_positions = {"computed": 0, "reused": 0}
        self._copies: list[SlotCopy] = []

    def free_slots(self) -> list[int]:
        taken = {row.slot for row in self.rows}
        return [slot for slot in range(self.max_batch) if slot not in taken]

    def place(self, row: Row, piece: Piece) -> int:
        """Give ``row`` the lowest free slot for ``piece`` and return how many prompt positions it reuses:
        the longest prefix of its key that any slot's cache holds (copied there by the next step when
        another slot holds it)."""
        target = self.free_slots()[0]
        if self.reuse and piece.key is not None:
            source, common = target, common_prefix(self.cached[target], piece.key)
            for slot in range(self.max_batch):
                length = common_prefix(self.cached[slot], piece.key)
                if length > common:
                    source, common = slot, length
            common = min(common, piece.length - 1)  # the last position is always computed
            if source != target and common > 0:
                self._copies.append(SlotCopy(source, target, common))
                self.cached[target] = self.cached[source][:common]
        row.slot = target
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
            cached.append(frame_key(codes, row.piece.owner))
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
        talking streams wait at most about one chunk's compute for their next frame); a row whose prompt
        completes decodes its first frame in the same step. Slot copies (prefixes, packing) come first."""
        self._pack()
        plan = StepPlan(copies=self._copies)
        self._copies = []
        budget = self.chunk
        for row in self.rows:
            if row.prefilling:
                if budget > 0:
                    length = min(budget, row.piece.length - row.computed)
                    plan.prefill.append((row, row.computed, length))
                    budget -= length
                    if row.computed + length == row.piece.length and can_decode(row):
                        plan.decode.append(row)
            elif row.piece is not None and can_decode(row):
                plan.decode.append(row)
        return plan

    def _pack(self) -> None:
        """Move the highest busy rows down into holes while that makes the step's bucket smaller; what a
        hole held moves up into the slot its new row left (via the spare slot)."""
        spare = self.max_batch
        while self.rows:
            top = max(self.rows, key=lambda row: row.slot)
            if bucket(len(self.rows), self.max_batch) >= bucket(top.slot + 1, self.max_batch):
                return
            hole, old = self.free_slots()[0], top.slot
            held = self.cached[hole]
            if held:
                self._copies.append(SlotCopy(hole, spare, len(held)))
            self._copies.append(SlotCopy(old, hole, top.extent, top))
            if held:
                self._copies.append(SlotCopy(spare, old, len(held)))
            self.cached[hole], self.cached[old] = list(self.cached[old]), held
            top.slot = hole
