"""Text normalisation for speech: written English to the words a voice says, with a map back.

CSM reads digits and symbols poorly, so "Your total is $42.50, due 12/03; call 555-0123" goes to
the model as "Your total is forty-two dollars and fifty cents, due December third; call five five
five, oh one two three". The rules, one per kind of text, are in :mod:`csmserve.text.rules_en`;
the categories and choices are listed in ``docs/normalisation.md``.

:func:`normalize` never raises and never drops a word: text no rule matches (words, names,
punctuation, spelled-out numbers, other languages) is copied as it is, and every character of the
input is covered by the spoken text (:attr:`Normalized.spans`). Pure: no I/O, no torch.

Streamed text is normalised one sentence at a time (``SentenceBuffer`` in
:mod:`csmserve.text.sentences` keeps numbers, prices, times, addresses and abbreviations whole).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from csmserve.text.rules_en import RULES, Rule

log = logging.getLogger(__name__)

Span = tuple[int, int]


@dataclass(frozen=True)
class Normalized:
    """Spoken ``text`` for the written ``source``, and where each spoken character came from.

    ``spans[i]`` is the half-open range ``[start, end)`` of ``source`` that ``text[i]`` says: one
    character for copied text, the whole written form for a replacement ("$42.50" for each character
    of "forty-two dollars and fifty cents"). ``len(spans) == len(text)``; starts and ends never
    decrease; every character of ``source`` lies in some span.
    """

    source: str
    text: str
    spans: tuple[Span, ...]

    @classmethod
    def unchanged(cls, text: str) -> Normalized:
        """``text`` spoken as written (normalisation off)."""
        return cls(text, text, tuple((i, i + 1) for i in range(len(text))))

    def __add__(self, other: Normalized) -> Normalized:
        """``self`` followed by ``other`` (e.g. the whitespace before a sentence, then the sentence)."""
        shift = len(self.source)
        spans = self.spans + tuple((s + shift, e + shift) for s, e in other.spans)
        return Normalized(self.source + other.source, self.text + other.text, spans)

    def breaks(self) -> list[int]:
        """Where spoken ``text`` may be cut without cutting a replacement: 0, ``len(text)``, and every
        ``i`` where ``text[i]`` says other written characters than ``text[i - 1]``."""
        inner = [i for i in range(1, len(self.text)) if self.spans[i] != self.spans[i - 1]]
        return [0, *inner, len(self.text)] if self.text else [0]

    def part(self, start: int, end: int) -> Normalized:
        """Spoken ``text[start:end]`` and the written text it says, as a :class:`Normalized` of its own.

        ``start`` and ``end`` are :meth:`breaks`: the parts between consecutive breaks concatenate
        back to ``self``. At the ends of ``text`` the written text not said by anything is included.
        """
        if start not in (0, len(self.text)) and self.spans[start] == self.spans[start - 1]:
            raise ValueError(f"{start} cuts a replacement")
        if end not in (0, len(self.text)) and self.spans[end] == self.spans[end - 1]:
            raise ValueError(f"{end} cuts a replacement")
        first = 0 if start == 0 else self.spans[start][0] if start < len(self.text) else len(self.source)
        last = len(self.source) if end >= len(self.text) else self.spans[end][0]
        spans = tuple((s - first, e - first) for s, e in self.spans[start:end])
        return Normalized(self.source[first:last], self.text[start:end], spans)

    def to_source(self, start: int, end: int) -> Span:
        """The range of ``source`` that spoken ``text[start:end]`` says (empty: a point in ``source``)."""
        start, end = max(0, min(start, len(self.text))), max(0, min(end, len(self.text)))
        if start >= end:
            at = self.spans[start][0] if start < len(self.spans) else len(self.source)
            return at, at
        return self.spans[start][0], self.spans[end - 1][1]

    def to_spoken(self, start: int, end: int) -> Span:
        """The range of spoken ``text`` that says ``source[start:end]`` (empty when none of it is said)."""
        said = [i for i, (s, e) in enumerate(self.spans) if s < end and e > start]
        if not said:
            at = next((i for i, (s, _) in enumerate(self.spans) if s >= end), len(self.text))
            return at, at
        return said[0], said[-1] + 1

    def source_alignment(
        self, chars: Sequence[str], starts: Sequence[float], ends: Sequence[float]
    ) -> tuple[list[str], list[float], list[float]]:
        """Timings of the spoken text's characters, carried over to the characters of ``source``.

        ``chars``/``starts``/``ends`` are the spoken text's alignment (``normalized_alignment``,
        e.g. from ``spread_timings(normalized.text, ...)``); the result is ``source``'s
        (``alignment``): its characters, and for each a start and end in the same unit. The
        characters of one replacement share its time evenly ("$42.50" takes as long as "forty-two
        dollars and fifty cents", each of its six characters a sixth of it). Times never decrease.
        """
        if list(chars) != list(self.text) or len(starts) != len(self.text) or len(ends) != len(self.text):
            raise ValueError("the alignment is not of this normalised text")
        out_starts: list[float] = []
        out_ends: list[float] = []
        i = 0
        while i < len(self.spans):
            j = i
            while j + 1 < len(self.spans) and self.spans[j + 1] == self.spans[i]:
                j += 1
            (first, last), t0, t1 = self.spans[i], starts[i], ends[j]
            if first > len(out_starts):  # nothing spoke these characters: zero-length, at the time reached
                at = out_ends[-1] if out_ends else t0
                out_starts += [at] * (first - len(out_starts))
                out_ends += [at] * (first - len(out_ends))
            step = (t1 - t0) / (last - first)
            out_starts += [t0 + step * k for k in range(last - first)]
            out_ends += [t0 + step * (k + 1) for k in range(last - first)]
            i = j + 1
        at = out_ends[-1] if out_ends else 0.0
        out_starts += [at] * (len(self.source) - len(out_starts))
        out_ends += [at] * (len(self.source) - len(out_ends))
        return list(self.source), out_starts, out_ends


def _replacements(text: str) -> list[tuple[int, int, str]]:
    """``(start, end, spoken)`` for each rule match that wins, in text order.

    Rules run in priority order; a match overlapping an earlier rule's is skipped, and the search
    goes on one character later, so a shorter match inside the free text is still found.
    """
    taken = [False] * len(text)
    found = []
    for rule in RULES:
        pos = 0
        while pos < len(text) and (match := rule.pattern.search(text, pos)):
            start, end = match.span()
            spoken = None if start == end or any(taken[start:end]) else _speak(rule, match)
            if not spoken:
                pos = start + 1
                continue
            taken[start:end] = [True] * (end - start)
            found.append((start, end, spoken))
            pos = end
    return sorted(found)


def _speak(rule: Rule, match: re.Match[str]) -> str | None:
    try:
        return rule.speak(match)
    except Exception:  # noqa: BLE001
        # The rules run on whatever a caller sends, mid-conversation: a rule that trips over odd text
        # leaves that text as written rather than failing the request. The fuzz tests keep this unused.
        log.warning("normalisation rule %r failed on %r", rule.name, match.group(), exc_info=True)
        return None


def normalize(text: str) -> Normalized:
    """``text`` as it should be spoken, with the map back (see :class:`Normalized`). Never raises."""
    chars: list[str] = []
    spans: list[Span] = []
    pos = 0
    for start, end, spoken in _replacements(text):
        chars += text[pos:start]
        spans += [(i, i + 1) for i in range(pos, start)]
        # Keep words apart: "R&D" is "R and D", not "RandD".
        if chars and chars[-1].isalnum() and spoken[0].isalnum():
            spoken = " " + spoken
        if end < len(text) and text[end].isalnum() and spoken[-1].isalnum():
            spoken += " "
        chars += spoken
        spans += [(start, end)] * len(spoken)
        pos = end
    chars += text[pos:]
    spans += [(i, i + 1) for i in range(pos, len(text))]
    return Normalized(text, "".join(chars), tuple(spans))


def normalize_for_speech(text: str, enabled: bool = True) -> Normalized:
    """The per-request switch: :func:`normalize` when ``enabled``, else ``text`` unchanged (same shape)."""
    return normalize(text) if enabled else Normalized.unchanged(text)


def warm_up() -> None:
    """Load the word libraries now rather than on the first request with a number in it.

    ``inflect`` takes a second or more to import; a server calls this while its model loads.
    """
    normalize("On Dec 3rd, 1999 I paid $4.50 for 2 kg.")
