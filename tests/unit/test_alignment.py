"""ElevenLabs' alignments as the audio streams: each chunk the characters it speaks, all of them once."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from csmserve.api.elevenlabs.alignment import DEFAULT_MS_PER_WEIGHT, StreamAligner
from csmserve.api.elevenlabs.formats import parse_output_format
from csmserve.speech.spoken import spoken_sentences

PCM = parse_output_format("pcm_24000")  # 48 bytes a millisecond
MS = 48


def stream(aligner: StreamAligner, text: str, chunks_per_sentence: list[list[int]]) -> list:
    """Feed ``text``'s sentences with chunks of the given lengths (ms; the last one of each is the cut)."""
    out = []
    for sentence, chunks in zip(spoken_sentences(text), chunks_per_sentence):
        aligner.start(sentence)
        for i, ms in enumerate(chunks):
            out.append(aligner.chunk(b"\0" * (ms * MS), last=i == len(chunks) - 1))
    return out


def test_the_chunks_characters_add_up_to_the_text_as_sent_and_as_spoken():
    """Two sentences in 200 ms chunks: the written characters are the text, the spoken ones its spoken form."""
    text = "Your total is $42.50, due 12/03. Call 555-0123 today."
    aligned = stream(StreamAligner(PCM), text, [[200] * 12 + [40], [200] * 14 + [120]])
    chars = [a for a in aligned if a is not None]
    assert "".join(c for a in chars for c in a.written[0]) == text
    assert "".join(c for a in chars for c in a.spoken[0]) == "".join(n.text for n in spoken_sentences(text))
    for a in chars:  # each chunk's characters lie within its own audio, and fill it
        for starts, ends in ((a.written[1], a.written[2]), (a.spoken[1], a.spoken[2])):
            assert a.start_ms <= starts[0] and ends[-1] <= a.end_ms + 1e-6
        assert a.spoken[1][0] == a.start_ms and abs(a.spoken[2][-1] - a.end_ms) < 1e-6


def test_every_chunk_speaks_characters_when_the_pace_holds():
    """At the default pace every 200 ms chunk carries characters; the cut is left with only a few."""
    text = "The quick brown fox jumps over the lazy dog and keeps running far away."
    (sentence,) = spoken_sentences(text)
    total_ms = int(sum(1.0 if c.isalnum() else 0.5 for c in sentence.text) * DEFAULT_MS_PER_WEIGHT)
    aligned = stream(StreamAligner(PCM), text, [[200] * (total_ms // 200) + [total_ms % 200]])
    assert all(a is not None for a in aligned)
    assert len(aligned[-1].spoken[0]) <= 4


def test_the_pace_of_earlier_sentences_sets_the_pace_of_the_next():
    """A stream that speaks twice as fast as the default: from the second sentence on, the chunks
    keep up with it instead of leaving most characters to the sentence's last chunk."""
    sentence = "The quick brown fox jumps over the lazy dog today."
    weight = sum(1.0 if c.isalnum() else 0.5 for c in sentence)
    fast_ms = int(weight * DEFAULT_MS_PER_WEIGHT / 2)
    chunks = [200] * (fast_ms // 200) + [fast_ms % 200]
    aligner = StreamAligner(PCM)
    aligned = stream(aligner, f"{sentence} {sentence}", [chunks, chunks])
    first, second = aligned[: len(chunks)], aligned[len(chunks) :]
    assert aligner.ms_per_weight < DEFAULT_MS_PER_WEIGHT * 0.6
    assert len(first[-1].spoken[0]) > len(sentence) / 3  # the default pace fell behind
    assert len(second[-1].spoken[0]) < len(sentence) / 5  # the learned one kept up
    assert all(a is not None for a in second[:-1])


def test_a_replacement_is_never_cut_between_two_chunks():
    """"forty-two dollars and fifty cents" goes out whole, in the chunk whose audio reaches its end."""
    text = "Pay $42.50 now please."
    aligned = [a for a in stream(StreamAligner(PCM), text, [[80] * 20 + [0]]) if a is not None]
    said = ["".join(a.spoken[0]) for a in aligned]
    assert [s for s in said if "forty" in s or "cents" in s] == [s for s in said if "forty-two dollars and fifty cents" in s]
    assert sum("$42.50" in "".join(a.written[0]) for a in aligned) == 1


def test_a_chunk_after_the_last_sentence_speaks_nothing():
    """The encoder's tail after the stream's last sentence carries no characters."""
    aligner = StreamAligner(PCM)
    stream(aligner, "Hello there.", [[200, 100]])
    assert aligner.chunk(b"\0" * 480) is None


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.sampled_from(["Hi.", "It costs $3.20!", "Call 555-0123 now.", "On 12/03/2025, at 9am.", "Dr. Who?"]),
             min_size=1, max_size=4),
    st.lists(st.lists(st.integers(0, 400), min_size=1, max_size=8), min_size=10, max_size=10),
)  # fmt: skip
def test_any_chunking_covers_the_text_exactly_once_with_times_that_never_go_back(sentences, chunks):
    """Whatever the chunk sizes: every character once, in order, and start times that never decrease."""
    text = " ".join(sentences)
    aligned = [a for a in stream(StreamAligner(PCM), text, chunks) if a is not None]
    assert "".join(c for a in aligned for c in a.written[0]) == text
    starts = [t for a in aligned for t in a.written[1]]
    assert all(x <= y + 1e-9 for x, y in pairwise(starts))
