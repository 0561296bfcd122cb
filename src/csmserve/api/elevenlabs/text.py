"""Text of one ElevenLabs context: when buffered text is spoken, and character timings of what was.

:class:`ContextText` decides when streamed text becomes speech. With ``auto_mode`` every sentence
goes as soon as it is certain (the sentence splitter of ``/ws/generate``'s streamed text, so both
produce the same sentences for the same text). Without it, text waits until the buffer holds
``chunk_length_schedule[i]`` characters (ElevenLabs' default: 120, 160, 250, 290, then 290 each),
then what is buffered goes, cut into sentences. ``flush`` speaks everything; ``try_trigger_generation``
speaks the complete sentences, or everything once 50 characters wait.

:func:`spread_timings` is the alignment: CSM gives no character timings, so each sentence's audio
span is spread over its characters in proportion to a rough weight (spaces and punctuation count
half a letter). They are estimates.
"""

from __future__ import annotations

from collections.abc import Sequence

from csmserve.text.sentences import SentenceBuffer

DEFAULT_SCHEDULE = (120, 160, 250, 290)
#: try_trigger_generation speaks an unfinished sentence only once this many characters wait.
MIN_TRIGGER_CHARS = 50


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

    def push(self, text: str) -> list[str]:
        self._ready += self._buffer.push(text)
        self._waiting += len(text)
        if self._waiting >= self.max_chars:
            return self._take(self._ready + self._buffer.flush(), everything=True)
        if self.auto_mode:
            return self._take(self._ready)
        if self._waiting >= self.schedule[min(self._step, len(self.schedule) - 1)]:
            self._step += 1
            return self._take(self._ready + self._buffer.flush(), everything=True)
        return []

    def try_trigger(self) -> list[str]:
        if self._ready or self._waiting < MIN_TRIGGER_CHARS:
            return self._take(self._ready)
        return self._take(self._buffer.flush(), everything=True)

    def flush(self) -> list[str]:
        self._step = 0
        return self._take(self._ready + self._buffer.flush(), everything=True)

    def _take(self, sentences: list[str], everything: bool = False) -> list[str]:
        self._ready = []
        spoken = sum(len(s) + 1 for s in sentences)
        self._waiting = 0 if everything else max(0, self._waiting - spoken)
        return sentences


def spread_timings(text: str, start_ms: float, duration_ms: float) -> tuple[list[str], list[float], list[float]]:
    """Characters of ``text`` with estimated start and end times (ms) over ``[start_ms, start_ms + duration_ms]``.

    Letters and digits weigh 1, anything else 0.5; times are monotonic, each character's end is the
    next one's start, and the last ends at ``start_ms + duration_ms``.
    """
    chars = list(text)
    weights = [1.0 if c.isalnum() else 0.5 for c in chars]
    total = sum(weights) or 1.0
    starts, ends, at = [], [], 0.0
    for weight in weights:
        starts.append(start_ms + duration_ms * at / total)
        at += weight
        ends.append(start_ms + duration_ms * at / total)
    return chars, starts, ends


def ws_alignment(text: str, duration_ms: float) -> dict:
    """The WebSocket ``alignment`` object: ``chars``, ``charStartTimesMs``, ``charDurationsMs`` (integers,
    relative to the start of this text's audio; durations add up to ``duration_ms``, rounded)."""
    chars, starts, ends = spread_timings(text, 0.0, duration_ms)
    start_ms = [round(s) for s in starts]
    durations = [round(e) - round(s) for s, e in zip(starts, ends)]
    return {"chars": chars, "charStartTimesMs": start_ms, "charDurationsMs": durations}


def http_alignment(pieces: Sequence[tuple[str, float, float]]) -> dict:
    """The HTTP ``alignment`` object (``characters``, ``character_start_times_seconds``,
    ``character_end_times_seconds``) for ``(text, start_ms, duration_ms)`` pieces, times from the
    start of the whole audio."""
    characters: list[str] = []
    starts: list[float] = []
    ends: list[float] = []
    for text, start_ms, duration_ms in pieces:
        c, s, e = spread_timings(text, start_ms, duration_ms)
        characters += c
        starts += [round(x / 1000, 3) for x in s]
        ends += [round(x / 1000, 3) for x in e]
    return {"characters": characters, "character_start_times_seconds": starts, "character_end_times_seconds": ends}
