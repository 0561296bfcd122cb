"""Text of one ElevenLabs context: when buffered text is spoken, and character timings of what was.

:class:`ContextText` decides when streamed text becomes speech. With ``auto_mode`` every sentence
goes as soon as it is certain (the sentence splitter of ``/ws/generate``'s streamed text, so both
produce the same sentences for the same text). Without it, text waits until the buffer holds
``chunk_length_schedule[i]`` characters (ElevenLabs' default: 120, 160, 250, 290, then 290 each),
then what is buffered goes, cut into sentences. ``flush`` speaks everything; ``try_trigger_generation``
speaks the complete sentences, or everything once 50 characters wait. Outside a flush, a word still
being written (no whitespace after it yet) waits for its end: "$42." then "50" is one price.

:func:`spread_timings` is the alignment: CSM gives no character timings, so audio spans are spread
over their characters in proportion to a rough weight (:func:`char_weight`: spaces and punctuation
count half a letter). They are estimates. :func:`ws_alignment` and :func:`http_alignment` write
timings in each route's shape.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from csmserve.text.sentences import SentenceBuffer

DEFAULT_SCHEDULE = (120, 160, 250, 290)
#: try_trigger_generation speaks an unfinished sentence only once this many characters wait.
MIN_TRIGGER_CHARS = 50
#: Characters with a start and an end time each (ms): ``(chars, starts, ends)``.
Timings = tuple[list[str], list[float], list[float]]
# The last word of a text and the whitespace before it.
_LAST_WORD = re.compile(r"(?:^|\s+)(\S+)$")


class ContextText:
    """Buffered text of one context. Each method returns the sentences to speak now, in order.

    ``max_chars`` bounds what may wait: beyond it, everything buffered is spoken at once.
    """

    def __init__(self, schedule: Sequence[int] = DEFAULT_SCHEDULE, auto_mode: bool = False, max_chars: int = 4096):
        self.schedule = tuple(schedule) or DEFAULT_SCHEDULE
        self.auto_mode = auto_mode
        self.max_chars = max_chars
        self._buffer = SentenceBuffer()
        self._ready: list[str] = []  # complete sentences held back by the schedule
        self._waiting = 0  # characters received and not yet spoken (whitespace included)
        self._step = 0
        self._open_word = False  # the last text received ends inside a word

    def push(self, text: str) -> list[str]:
        self._ready += self._buffer.push(text)
        self._waiting += len(text)
        if text:
            self._open_word = not text[-1].isspace()
        if self._waiting >= self.max_chars:
            return self._take(self._ready + self._buffer.flush(), everything=True)
        if self.auto_mode:
            return self._take(self._ready)
        if self._waiting >= self.schedule[min(self._step, len(self.schedule) - 1)]:
            self._step += 1
            return self._take_words()
        return []

    def try_trigger(self) -> list[str]:
        if self._ready or self._waiting < MIN_TRIGGER_CHARS:
            return self._take(self._ready)
        return self._take_words()

    def flush(self) -> list[str]:
        self._step = 0
        return self._take(self._ready + self._buffer.flush(), everything=True)

    def _take_words(self) -> list[str]:
        """Everything buffered but a word still being written, which waits for the rest of it."""
        sentences = self._ready + self._buffer.flush()
        held = ""
        if self._open_word and sentences:
            last = _LAST_WORD.search(sentences[-1])
            held = last.group(1)
            sentences[-1] = sentences[-1][: last.start()]
            if not sentences[-1]:
                sentences.pop()
        taken = self._take(sentences, everything=True)
        self._buffer.push(held)  # no whitespace in it: releases nothing
        self._waiting = len(held)
        return taken

    def _take(self, sentences: list[str], everything: bool = False) -> list[str]:
        self._ready = []
        spoken = sum(len(s) + 1 for s in sentences)
        self._waiting = 0 if everything else max(0, self._waiting - spoken)
        return sentences


def char_weight(char: str) -> float:
    """How long a character takes, relative to a letter: letters and digits 1, anything else 0.5."""
    return 1.0 if char.isalnum() else 0.5


def spread_timings(text: str, start_ms: float, duration_ms: float) -> Timings:
    """Characters of ``text`` with estimated start and end times (ms) over ``[start_ms, start_ms + duration_ms]``.

    Times are spread by :func:`char_weight`; they are monotonic, each character's end is the next
    one's start, and the last ends at ``start_ms + duration_ms``.
    """
    chars = list(text)
    weights = [char_weight(c) for c in chars]
    total = sum(weights) or 1.0
    starts, ends, at = [], [], 0.0
    for weight in weights:
        starts.append(start_ms + duration_ms * at / total)
        at += weight
        ends.append(start_ms + duration_ms * at / total)
    return chars, starts, ends


def joined(timings: Iterable[Timings]) -> Timings:
    """Timings one after another, as one."""
    chars: list[str] = []
    starts: list[float] = []
    ends: list[float] = []
    for c, s, e in timings:
        chars += c
        starts += s
        ends += e
    return chars, starts, ends


def ws_alignment(timings: Timings, origin_ms: float = 0.0) -> dict:
    """The WebSocket ``alignment`` object: ``chars``, ``charStartTimesMs``, ``charDurationsMs``: integer
    ms from ``origin_ms`` (the start of the message's audio); durations add up to the span, rounded."""
    chars, starts, ends = timings
    start_ms = [round(s - origin_ms) for s in starts]
    durations = [round(e - origin_ms) - round(s - origin_ms) for s, e in zip(starts, ends)]
    return {"chars": list(chars), "charStartTimesMs": start_ms, "charDurationsMs": durations}


def http_alignment(timings: Timings) -> dict:
    """The HTTP ``alignment`` object (``characters``, ``character_start_times_seconds``,
    ``character_end_times_seconds``): seconds from the start of the whole audio, to the millisecond."""
    chars, starts, ends = timings
    return {
        "characters": list(chars),
        "character_start_times_seconds": [round(x / 1000, 3) for x in starts],
        "character_end_times_seconds": [round(x / 1000, 3) for x in ends],
    }
