"""Written text to what the engine says: sentences first, then each normalised (``docs/normalisation.md``).

Splitting comes first because the splitter relies on the written dots ("Dr. Smith", "$42.50", "9 a.m.")
that normalisation turns into words. The APIs turn whole texts into speech here (text streamed in is cut
by a ``SentenceBuffer`` and each sentence normalised the same way); the
:class:`~csmserve.speech.request.SpeechRequest` they build carries the spoken text.
"""

from __future__ import annotations

from collections.abc import Iterator

from csmserve.text.normalize import Normalized, normalize_for_speech
from csmserve.text.sentences import split_sentences


def spoken_sentences(text: str, enabled: bool = True) -> Iterator[Normalized]:
    """The sentences of ``text``, each with its spoken form (``enabled`` False: as written), each
    normalised only when it is asked for (a stream's first audio does not wait for the whole text).

    A sentence's ``source`` is the written sentence with the whitespace before it (the last one also
    takes the whitespace after it), so the sources concatenate back to ``text`` exactly; its ``text``
    is the spoken form with that same whitespace around it (the engine says ``text.strip()``).
    Nothing for blank text.
    """
    sentences = split_sentences(text)
    at = 0
    for i, sentence in enumerate(sentences):
        start = text.index(sentence, at)
        end = start + len(sentence) if i + 1 < len(sentences) else len(text)
        spoken = normalize_for_speech(sentence, enabled)
        yield Normalized.unchanged(text[at:start]) + spoken + Normalized.unchanged(text[start + len(sentence) : end])
        at = end


def spoken_text(text: str, enabled: bool = True) -> str:
    """What the engine says for ``text``: its sentences' spoken forms, with the whitespace between
    them as written (``text`` itself when there is nothing to rewrite, or ``enabled`` is False)."""
    return "".join(n.text for n in spoken_sentences(text, enabled)) if enabled else text
