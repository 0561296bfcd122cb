"""Which characters each audio chunk speaks, as the audio streams: ElevenLabs' ``alignment`` (the text
as sent) and ``normalizedAlignment`` (the spoken text) of every chunk.

CSM gives no character timings, so these are estimates. A sentence's characters go out with the audio
in step with an estimated pace (milliseconds per :func:`~csmserve.api.elevenlabs.text.char_weight`,
learned from the stream's earlier sentences; :data:`DEFAULT_MS_PER_WEIGHT` before the first ends):
each chunk carries the characters the pace says its audio reached, spread over the chunk's own span,
and the sentence's last chunk carries the rest. A replacement ("forty-two dollars and fifty cents"
for "$42.50") is never cut between two chunks. Over a stream the chunks' characters concatenate to
the whole text exactly once, with times that never go back.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

from csmserve.api.elevenlabs.formats import OutputFormat
from csmserve.api.elevenlabs.text import Timings, char_weight, spread_timings
from csmserve.text.normalize import Normalized

#: The pace before a stream has spoken a sentence: ms per letter (about 13 characters a second).
DEFAULT_MS_PER_WEIGHT = 80.0


@dataclass(frozen=True)
class Aligned:
    """The characters one chunk speaks: ``written`` (``alignment``, the text as sent) and ``spoken``
    (``normalizedAlignment``), times in ms from the start of the stream's audio; the chunk's audio
    spans ``[start_ms, end_ms]``."""

    written: Timings
    spoken: Timings
    start_ms: float
    end_ms: float


class StreamAligner:
    """One stream's chunks (in ``output``'s format) to the characters each speaks. Feed it each
    sentence (:meth:`start`), then every chunk of the stream in order (:meth:`chunk`), the sentence's
    last with ``last=True``. Not thread-safe."""

    def __init__(self, output: OutputFormat):
        self.output = output
        self.at_ms = 0.0  # audio sent so far
        self.ms_per_weight = DEFAULT_MS_PER_WEIGHT
        self._heard_ms = 0.0  # audio of the sentences ended so far, and their weight: the learned pace
        self._heard_weight = 0.0
        self._sentence: Normalized | None = None
        self._began_ms = 0.0
        self._weights: list[float] = []  # weight of the spoken text up to each break
        self._breaks: list[int] = []
        self._said = 0  # spoken characters already sent

    def start(self, sentence: Normalized) -> None:
        """The next sentence: its audio comes next. ``sentence.source`` is its written text (with the
        whitespace before it), ``sentence.text`` what is spoken."""
        self._sentence, self._began_ms, self._said = sentence, self.at_ms, 0
        self._breaks = sentence.breaks()
        total = [0.0, *accumulate(char_weight(c) for c in sentence.text)]
        self._weights = [total[b] for b in self._breaks]

    def chunk(self, audio: bytes, *, last: bool = False) -> Aligned | None:
        """The characters ``audio`` (the stream's next chunk) speaks; None when it speaks none."""
        start_ms = self.at_ms
        self.at_ms += self.output.ms_of(len(audio))
        sentence = self._sentence
        if sentence is None:
            return None
        if last:
            reach = len(sentence.text)
            self._sentence = None
            self._heard_ms += self.at_ms - self._began_ms
            self._heard_weight += self._weights[-1]
            if self._heard_ms > 0 and self._heard_weight > 0:
                self.ms_per_weight = self._heard_ms / self._heard_weight
        else:  # the last break the pace has passed, keeping the final one for the last chunk
            said = (self.at_ms - self._began_ms) / self.ms_per_weight
            reach = max((b for b, w in zip(self._breaks[:-1], self._weights) if w <= said), default=0)
        if reach <= self._said:
            return None
        part = sentence.part(self._said, reach)
        self._said = reach
        spoken = spread_timings(part.text, start_ms, self.at_ms - start_ms)
        return Aligned(part.source_alignment(*spoken), spoken, start_ms, self.at_ms)
