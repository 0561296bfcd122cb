"""A step model that records what each engine step did, for tests that count steps instead of timing them."""

from __future__ import annotations

from collections import defaultdict


class Recording:
    """The engine's step model, recording what each step did: a wrapper, not a mock (it delegates)."""

    def __init__(self, inner):
        self.inner = inner
        self.codes: dict[str, list[list[int]]] = defaultdict(list)
        self.steps: list[tuple[str | None, list[str]]] = []  # (prefilled request, decoded requests)
        self.prefilled_together: list[list[str]] = []  # per step that prefilled: the requests it prefilled
        self.copies: list = []  # (SlotCopy, the moving request's id or None), in order
        self._prefilled: str | None = None

    def next_piece(self, stream):
        return self.inner.next_piece(stream)

    def enter(self, stream, slot):
        self.inner.enter(stream, slot)

    def start_piece(self, row):
        self.inner.start_piece(row)

    def leave(self, stream, slot):
        self.inner.leave(stream, slot)

    def copy(self, copies):
        self.copies.extend((copy, copy.row.stream.request.request_id if copy.row else None) for copy in copies)
        self.inner.copy(copies)

    def prefill(self, chunks):
        if self._prefilled is not None:  # the previous step prefilled and decoded nothing
            self.steps.append((self._prefilled, []))
        # The oldest prompt prefilled in the step (a step may prefill several together).
        self._prefilled = chunks[0][0].stream.request.request_id
        self.prefilled_together.append([row.stream.request.request_id for row, _, _ in chunks])
        self.inner.prefill(chunks)

    def decode(self, rows):
        frames = self.inner.decode(rows)
        self.steps.append((self._prefilled, [row.stream.request.request_id for row in rows]))
        self._prefilled = None
        for row, frame in zip(rows, frames):
            if frame is not None:
                self.codes[row.stream.request.request_id].append(frame.codes)
        return frames
