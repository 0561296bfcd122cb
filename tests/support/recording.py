"""A step model that records what each engine step did, for tests that count steps instead of timing them."""

from __future__ import annotations

from collections import defaultdict


class Recording:
    """The engine's step model, recording what each step did: a wrapper, not a mock (it delegates)."""

    def __init__(self, inner):
        self.inner = inner
        self.codes: dict[str, list[list[int]]] = defaultdict(list)
        self.steps: list[tuple[str | None, list[str]]] = []  # (prefilled request, decoded requests)
        self._prefilled: str | None = None

    def next_piece(self, stream):
        return self.inner.next_piece(stream)

    def enter(self, stream, slot):
        self.inner.enter(stream, slot)

    def leave(self, stream, slot):
        self.inner.leave(stream, slot)

    def prefill(self, row, start, length):
        if self._prefilled is not None:  # the previous step prefilled and decoded nothing
            self.steps.append((self._prefilled, []))
        self._prefilled = row.stream.request.request_id
        self.inner.prefill(row, start, length)

    def decode(self, rows):
        frames = self.inner.decode(rows)
        self.steps.append((self._prefilled, [row.stream.request.request_id for row in rows]))
        self._prefilled = None
        for row, frame in zip(rows, frames):
            if frame is not None:
                self.codes[row.stream.request.request_id].append(frame.codes)
        return frames
