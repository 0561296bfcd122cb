"""From written text to what the engine says: sentences first, then each one normalised."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from csmserve.speech.spoken import spoken_sentences, spoken_text
from csmserve.text.normalize import normalize


def test_sentences_are_split_on_the_written_dots_then_normalised():
    """"Dr." and "$42.50" keep their sentence whole; each sentence's spoken form is normalize's."""
    text = "Dr. Smith paid $42.50 at 9 a.m. on 12/03. Call 555-0123 today!"
    sentences = list(spoken_sentences(text))
    assert [n.source for n in sentences] == ["Dr. Smith paid $42.50 at 9 a.m. on 12/03.", " Call 555-0123 today!"]
    assert sentences[0].text == normalize("Dr. Smith paid $42.50 at 9 a.m. on 12/03.").text
    assert sentences[1].text == " " + normalize("Call 555-0123 today!").text
    assert spoken_text(text) == (
        "Doctor Smith paid forty-two dollars and fifty cents at nine a m on December third. "
        "Call five five five, oh one two three today!"
    )


def test_turned_off_the_text_is_spoken_as_sent():
    """enabled=False: the text as written, and each sentence's map is the identity."""
    text = "Pay $5 by 12/03.\n\nThanks."
    assert spoken_text(text, enabled=False) == text
    assert all(n.text == n.source for n in spoken_sentences(text, enabled=False))


def test_text_with_nothing_to_rewrite_reaches_the_engine_unchanged():
    """Whitespace between sentences stays as written: nothing to normalise, nothing changes."""
    text = "  Hello there.\nHow are you?  "
    assert spoken_text(text) == text


@settings(max_examples=150, deadline=None)
@given(st.text(st.sampled_from(list("ab 1.$\n?,:5-")), max_size=60))
def test_the_sentences_written_texts_concatenate_back_to_the_text(text):
    """Every character as sent belongs to exactly one sentence, in order (blank text: no sentence)."""
    sentences = list(spoken_sentences(text))
    assert "".join(n.source for n in sentences) == (text if text.strip() else "")
