"""English sentence splitting for TTS: whole texts, text streamed in token by token, and length bounds.

Boundaries come from ``sentencex`` (Wikimedia's rule-based segmenter: abbreviations such as Mr.,
Dr., e.g., U.S., p.m.; decimals and prices; ellipses; URLs and e-mail addresses; quotes), with two
repairs on top for what it gets wrong in text read aloud:

* a piece that starts with a lower-case letter continues the previous sentence
  ("3.5 lbs. of apples" is one sentence, whatever the abbreviation list says), and so does a
  number after an abbreviation that stands before numbers ("approx. 5 km", "Apt. 4", "5 lbs. 3 oz."),
  so that text normalised sentence by sentence reads the same as the whole text;
* a list number ("1.") goes with the item it numbers, and an opening quote with the sentence it
  opens, not with the sentence before them.

Sentences come back stripped of surrounding whitespace, never empty.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import sentencex

# What ends a piece but opens the next sentence: a list number ("2.") at the start of the piece,
# after a line break, or after a space that follows a sentence end or colon (not the "30." of
# "10:30." or the "14." of "3.14."); an opening quote or bracket after whitespace.
_OPENS_NEXT = re.compile(
    r"(?:(?:^|(?<=[.!?:;])\s+|(?<=\n)\s*)(?P<number>\d{1,3}\.\s*)|(?<=\s)(?P<quote>[\"'“‘«(\[]+))$"
)
# The first letter or digit of a piece, past opening quotes and brackets.
_FIRST_WORD_CHAR = re.compile(r"[\s\"'“‘(\[]*(\w)")
# Abbreviations that stand before a number; the segmenter ends a sentence at some of them.
_BEFORE_NUMBER = re.compile(
    r"\b(?:approx|apt|no|nos|vol|ch|fig|pp?|ext|tel|ste|rm|bldg|ca|lbs?|oz|ft)\.\s*$", re.IGNORECASE
)
_CLAUSE_BREAK = re.compile(r"(?<=[,;:—–])\s+")
# A word followed by whitespace: the segmenter has seen the whole of the next word.
_COMPLETE_WORD = re.compile(r"\S\s")


def _continues_sentence(previous: str, piece: str) -> bool:
    if not piece.strip():
        return True
    match = _FIRST_WORD_CHAR.match(piece)
    if match is None:
        return False
    first = match.group(1)
    return first.islower() or (first.isdigit() and _BEFORE_NUMBER.search(previous) is not None)


def _segments(text: str) -> list[str]:
    """Sentence pieces of ``text``, whitespace included, concatenating back to ``text`` exactly."""
    pieces = list(sentencex.segment("en", text))
    out: list[str] = []
    for i, piece in enumerate(pieces):
        if out and _continues_sentence(out[-1], piece):
            out[-1] += piece
            continue
        opener = _OPENS_NEXT.search(piece) if i + 1 < len(pieces) else None
        if opener:
            # Hand it to the next piece; the text stays in order either way.
            cut = opener.start(opener.lastgroup)
            pieces[i + 1] = piece[cut:] + pieces[i + 1]
            piece = piece[:cut]
            if not piece:
                continue
        out.append(piece)
    return out


def _clean(pieces: Iterable[str]) -> list[str]:
    return [s for s in (p.strip() for p in pieces) if s]


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text``, in order, stripped; [] for blank text."""
    return _clean(_segments(text))


class SentenceBuffer:
    """Collects text streamed in fragments (LLM tokens) and releases sentences once they are certain.

    A sentence is released when more text, past whitespace, follows its end: a fragment ending in
    "Dr." or "3." releases nothing yet. The segmenter decides "U.S. He" (two sentences) and
    "U.S. Hello" (one) by the whole next word, so a boundary counts as certain only once a complete
    word follows it. Whatever the fragment sizes, :meth:`push` and :meth:`flush` together return
    what :func:`split_sentences` returns for the whole text.
    """

    def __init__(self):
        self._pending = ""

    def push(self, fragment: str) -> list[str]:
        """Sentences completed by ``fragment`` (possibly none)."""
        self._pending += fragment
        segments = _segments(self._pending)
        unsure = 1 if _COMPLETE_WORD.search(segments[-1] if segments else "") else 2
        ready = segments[:-unsure] if len(segments) > unsure else []
        self._pending = self._pending[sum(map(len, ready)) :]
        return _clean(ready)

    @property
    def pending_chars(self) -> int:
        """Characters received but not yet released as sentences."""
        return len(self._pending)

    def flush(self) -> list[str]:
        """The rest, at the end of the text; the buffer is empty afterwards."""
        pending, self._pending = self._pending, ""
        return split_sentences(pending)


def chunk_for_window(sentences: Iterable[str], max_chars: int) -> list[str]:
    """Sentences packed, in order, into pieces of at most ``max_chars`` characters.

    Consecutive sentences share a piece (joined by one space) while they fit. A sentence longer
    than ``max_chars`` is cut at clause breaks (after , ; : or a dash), then between words, and a
    single word longer than ``max_chars`` is cut into ``max_chars``-sized parts. No text is lost.
    """
    if max_chars < 1:
        raise ValueError("max_chars must be at least 1")
    return _pack((part for sentence in sentences for part in _fit(sentence.strip(), max_chars)), max_chars)


def _fit(text: str, max_chars: int) -> list[str]:
    """``text`` as parts of at most ``max_chars``, cut at the coarsest breaks that make it fit."""
    if len(text) <= max_chars:
        return [text] if text else []
    for parts in (_CLAUSE_BREAK.split(text), text.split()):
        if len(parts) > 1:
            return _pack((p for part in parts for p in _fit(part, max_chars)), max_chars)
    return [text[i : i + max_chars] for i in range(0, len(text), max_chars)]


def _pack(parts: Iterable[str], max_chars: int) -> list[str]:
    packed: list[str] = []
    for part in parts:
        if packed and len(packed[-1]) + 1 + len(part) <= max_chars:
            packed[-1] += " " + part
        else:
            packed.append(part)
    return packed
