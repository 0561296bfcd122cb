"""Sentence splitting for TTS: whole texts, LLM token streams, and model-window packing."""

from __future__ import annotations

import random

import pytest

from csmserve.text.normalize import normalize
from csmserve.text.sentences import SentenceBuffer, chunk_for_window, split_sentences

STREAMED_TEXTS = [
    "Dr. Smith paid $4.99 for 3.5 lbs. of apples at 5 p.m. Then he left...",
    "Visit https://example.com/docs/v1.2 for more. Thanks!",
    'Steps: 1. Open the box. 2. Take it out. "Done?" she asked. “Yes,” he said.',
    "Mr. and Mrs. Jones live in the U.S. now. I live in the U.S. Hello to them! Pi is 3.14. Wait... what?",
    "Write to bob@example.org, or see https://example.com/a.b?c=d. He counted to 3. Then he stopped.",
    "Your total is $42.50, due 12/03/2025; call +1 (555) 123-4567. Dr. Smith sees you at 3:30 p.m. Dec. 3.",
    "It is approx. 5 km away, at 12 Main St. Apt. 4. The 3.5 km run costs €12.99 (10% off). Thanks!",
    "Visit www.example.com/help or mail help@example.com. We raised $1.5M in 2024, i.e. more than 1,234 yen.",
]
# Sentences in which a number, price, date, time, decimal, address or abbreviation sits next to a full stop.
SPOKEN_TEXTS = STREAMED_TEXTS + [
    "Call Dr. Jones at 9 a.m. Then call St. Mary's at 10:30. It weighs 5 lbs. 3 oz. in all.",
    "Order No. 12345 ships on 12/03. Version 1.2.3 is out. Pi is 3.14159. He counted to 3. Then he left.",
]


def _stream(text: str, seed: int) -> list[str]:
    rng, buffer, sentences, start = random.Random(seed), SentenceBuffer(), [], 0
    while start < len(text):
        size = rng.randint(1, 7)
        sentences += buffer.push(text[start : start + size])
        start += size
    return sentences + buffer.flush()


def test_abbreviations_decimals_prices_and_ellipses_do_not_split():
    """The brief's example: two sentences, whatever the dots inside the first."""
    assert split_sentences("Dr. Smith paid $4.99 for 3.5 lbs. of apples at 5 p.m. Then he left...") == [
        "Dr. Smith paid $4.99 for 3.5 lbs. of apples at 5 p.m.",
        "Then he left...",
    ]


def test_urls_and_emails_stay_whole():
    """Dots and question marks inside URLs and addresses are not sentence ends."""
    assert split_sentences("Visit https://example.com/docs/v1.2 for more. Thanks!") == [
        "Visit https://example.com/docs/v1.2 for more.",
        "Thanks!",
    ]
    assert split_sentences("See https://example.com/a.b?c=d or mail bob@example.org. Bye.") == [
        "See https://example.com/a.b?c=d or mail bob@example.org.",
        "Bye.",
    ]


def test_common_abbreviations():
    """Mr., Mrs., U.S., e.g. and Prof. end no sentence when the sentence goes on."""
    text = "Mr. and Mrs. Jones moved to the U.S. in May, e.g. to work. Prof. Lee came too."
    assert split_sentences(text) == [
        "Mr. and Mrs. Jones moved to the U.S. in May, e.g. to work.",
        "Prof. Lee came too.",
    ]


def test_a_number_can_still_end_a_sentence():
    """A number followed by a capitalised sentence is an end: "3." and "1990." here."""
    assert split_sentences("He counted to 3. Then he stopped. I was born in 1990. So was she.") == [
        "He counted to 3.",
        "Then he stopped.",
        "I was born in 1990.",
        "So was she.",
    ]


def test_numbered_list_items_keep_their_numbers():
    """Each item starts with its own number instead of the number ending the sentence before."""
    assert split_sentences("Steps: 1. Open the box. 2. Take it out. 3. Plug it in.") == [
        "Steps:",
        "1. Open the box.",
        "2. Take it out.",
        "3. Plug it in.",
    ]


def test_quotes_stay_with_their_sentence():
    """Closing quotes end the sentence they close; opening quotes start the next one."""
    assert split_sentences('"Hello there," she said. "How are you?" He smiled. “Fine,” he said.') == [
        '"Hello there," she said.',
        '"How are you?"',
        "He smiled.",
        "“Fine,” he said.",
    ]


def test_exclamations_questions_and_paragraphs():
    """?! runs end one sentence; a paragraph break ends one too; whitespace never makes a sentence."""
    assert split_sentences("What?! Really?? Yes.\n\nNew paragraph") == [
        "What?!",
        "Really??",
        "Yes.",
        "New paragraph",
    ]
    assert split_sentences("  \n ") == []


@pytest.mark.parametrize("text", STREAMED_TEXTS)
def test_streamed_fragments_give_the_same_sentences_as_the_whole_text(text):
    """Token-sized fragments of random lengths, pushed then flushed, split exactly like the whole text."""
    whole = split_sentences(text)
    for seed in range(40):
        assert _stream(text, seed) == whole


def test_times_and_decimals_ending_a_sentence_stay_whole():
    """The "30." of "10:30." and the "14." of "3.14." are not list numbers opening the next sentence."""
    assert split_sentences("Meet at 10:30. Then go. Pi is 3.14. So it is.") == [
        "Meet at 10:30.",
        "Then go.",
        "Pi is 3.14.",
        "So it is.",
    ]


def test_abbreviations_before_numbers_do_not_end_a_sentence():
    """approx., Apt., No. and lbs. before a number go on; a full stop after a plain number still ends one."""
    assert split_sentences("It is approx. 5 km away. Approx. 50 people came.") == [
        "It is approx. 5 km away.",
        "Approx. 50 people came.",
    ]
    assert split_sentences("He lives at 12 Main St. Apt. 4 now. It weighs 5 lbs. 3 oz. in all.") == [
        "He lives at 12 Main St. Apt. 4 now.",
        "It weighs 5 lbs. 3 oz. in all.",
    ]
    assert split_sentences("It costs $42. 50 people came.") == ["It costs $42.", "50 people came."]


@pytest.mark.parametrize(
    ("tokens", "sentence"),
    [
        (["Your total is $42", ".", "50", " today", "."], "Your total is $42.50 today."),
        (["It is 3", ".", "5 km", " away", "."], "It is 3.5 km away."),
        (["I met Dr", ".", " Smith", " today", "."], "I met Dr. Smith today."),
        (["Call 555", "-", "0123 at 9 a", ".", "m", ". tomorrow", "."], "Call 555-0123 at 9 a.m. tomorrow."),
        (["Due 12", "/", "03", "/", "2025 at 3", ":", "30", "."], "Due 12/03/2025 at 3:30."),
        (["See example", ".", "com", "/", "help for more", "."], "See example.com/help for more."),
        (["Mr", ".", " and Mrs", ". Jones, e", ".", "g", ". twice", "."], "Mr. and Mrs. Jones, e.g. twice."),
    ],
)
def test_numbers_prices_times_and_abbreviations_split_across_tokens_stay_in_one_sentence(tokens, sentence):
    """Tokens that cut "$42." from "50" or "Dr." from "Smith" release nothing early: one whole sentence."""
    buffer, released = SentenceBuffer(), []
    for token in tokens:
        released += buffer.push(token)
        assert all(r == sentence for r in released)
    released += buffer.push(" Next one")
    assert released == [sentence]
    assert buffer.flush() == ["Next one"]


@pytest.mark.parametrize("text", SPOKEN_TEXTS)
def test_normalising_sentence_by_sentence_says_the_same_as_the_whole_text(text):
    """No sentence boundary falls inside a price, date, time, decimal, address or abbreviation."""
    whole = normalize(text).text.split()
    by_sentence = [word for sentence in split_sentences(text) for word in normalize(sentence).text.split()]
    assert by_sentence == whole


def test_sentence_is_released_once_a_whole_next_word_follows():
    """Nothing at the full stop, nothing at the space, the sentence once the next word is complete."""
    buffer = SentenceBuffer()
    assert buffer.push("Hello there.") == []
    assert buffer.push(" ") == []
    assert buffer.push("How") == []
    assert buffer.push(" are") == ["Hello there."]
    assert buffer.flush() == ["How are"]


@pytest.mark.parametrize("head", ["I met Dr.", "It costs 3.", "I live in the U.S."])
def test_a_fragment_ending_in_a_dot_is_not_split_early(head):
    """A fragment ending in "Dr.", "3." or "U.S." waits for what follows."""
    buffer = SentenceBuffer()
    assert buffer.push(head) == []
    assert buffer.push(" ") == []


def test_flush_returns_the_rest_and_empties_the_buffer():
    """flush gives the unfinished tail, and a second flush gives nothing."""
    buffer = SentenceBuffer()
    assert buffer.push("One. Two and") == ["One."]
    assert buffer.flush() == ["Two and"]
    assert buffer.flush() == []


def test_short_sentences_are_packed_together():
    """Consecutive sentences share a piece while they fit, joined by one space."""
    assert chunk_for_window(["One.", "Two.", "Three is long."], 14) == ["One. Two.", "Three is long."]


def test_long_sentences_split_at_clause_breaks_first():
    """An over-long sentence is cut after commas, semicolons and colons before anywhere else."""
    sentence = "First we wait, then we listen; after that: we speak clearly."
    assert chunk_for_window([sentence], 30) == [
        "First we wait, then we listen;",
        "after that: we speak clearly.",
    ]


def test_long_clauses_split_between_words_and_long_words_are_cut():
    """Without clause breaks the cut falls between words; a word longer than the bound is cut into parts."""
    assert chunk_for_window(["the quick brown fox jumps over the lazy dog"], 15) == [
        "the quick brown",
        "fox jumps over",
        "the lazy dog",
    ]
    assert chunk_for_window(["Supercalifragilistic"], 8) == ["Supercal", "ifragili", "stic"]


def test_packing_respects_the_bound_and_loses_no_words():
    """Every piece fits, and the words of the pieces are the words of the input, in order."""
    sentences = split_sentences(" ".join(STREAMED_TEXTS))
    for max_chars in (10, 25, 80, 500):
        pieces = chunk_for_window(sentences, max_chars)
        assert all(0 < len(piece) <= max_chars for piece in pieces)
        if max_chars >= 40:  # no single word (the URLs) needs cutting at this bound
            assert " ".join(pieces).split() == " ".join(sentences).split()


def test_window_must_hold_a_character():
    """max_chars below 1 is refused."""
    with pytest.raises(ValueError, match="at least 1"):
        chunk_for_window(["Hi."], 0)
