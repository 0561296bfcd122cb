"""Text normalisation for speech: what each kind of written text sounds like, and the map back to it."""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csmserve.api.elevenlabs.text import spread_timings
from csmserve.text import normalize as normalize_module
from csmserve.text.normalize import Normalized, normalize, normalize_for_speech
from csmserve.text.rules_en import Rule

DOC = Path(__file__).resolve().parents[2] / "docs" / "normalisation.md"

CASES = [
    # cardinals, negatives, decimals
    ("It has 1,234,567 rows.",
     "It has one million two hundred thirty-four thousand five hundred sixty-seven rows."),
    ("Room 101", "Room one hundred one"),
    ("He was 100 years old.", "He was one hundred years old."),
    ("It fell to -5 degrees.", "It fell to minus five degrees."),
    ("−3", "minus three"),
    ("Pi is 3.14.", "Pi is three point one four."),
    ("It costs 0.5 euros.", "It costs zero point five euros."),
    ("Only .5 left.", "Only point five left."),
    # ordinals
    ("He came 1st, she came 22nd.", "He came first, she came twenty-second."),
    ("The 103rd time", "The one hundred third time"),
    ("Page 1,000th", "Page one thousandth"),
    # money
    ("$42.50", "forty-two dollars and fifty cents"),
    ("$0.99", "ninety-nine cents"),
    ("$1", "one dollar"),
    ("$1.01", "one dollar and one cent"),
    ("$42.5", "forty-two dollars and fifty cents"),
    ("$1,000", "one thousand dollars"),
    ("€5", "five euros"),
    ("£3.20", "three pounds and twenty pence"),
    ("¥500", "five hundred yen"),
    ("₹250", "two hundred fifty rupees"),
    ("$1.5M", "one point five million dollars"),
    ("$3k", "three thousand dollars"),
    ("£1.5bn", "one point five billion pounds"),
    ("$5 million", "five million dollars"),
    ("USD 100", "one hundred dollars"),
    ("Pay EUR 5.50 now.", "Pay five euros and fifty cents now."),
    ("100 GBP", "one hundred pounds"),
    ("-$5", "minus five dollars"),
    # percentages
    ("50%", "fifty percent"),
    ("Rates rose 3.5%.", "Rates rose three point five percent."),
    ("-2%", "minus two percent"),
    # dates
    ("Your total is $42.50, due 12/03; call 555-0123.",
     "Your total is forty-two dollars and fifty cents, due December third; "
     "call five five five, oh one two three."),
    ("12/03/2025", "December third, twenty twenty-five"),
    ("12/03/25", "December third, twenty-five"),
    ("2025-12-03", "December third, twenty twenty-five"),
    ("25/12/2025", "December twenty-fifth, twenty twenty-five"),
    ("Dec 3", "December third"),
    ("Dec. 3, 2025", "December third, twenty twenty-five"),
    ("December 3rd", "December third"),
    ("April 1st, 2024", "April first, twenty twenty-four"),
    ("3 December 2025", "the third of December, twenty twenty-five"),
    ("the 3rd of December", "the third of December"),
    ("on 4 Jul", "on the fourth of July"),
    ("December 2025", "December twenty twenty-five"),
    # times
    ("3:30 pm", "three thirty p m"),
    ("15:45", "fifteen forty-five"),
    ("9am", "nine a m"),
    ("10:00", "ten o'clock"),
    ("It was 15:00.", "It was fifteen hundred."),
    ("12:05 p.m.", "twelve oh five p m."),
    ("3:30:15", "three thirty and fifteen seconds"),
    ("Meet at 9 a.m. Then go.", "Meet at nine a m. Then go."),
    ("Meet at 9 a.m. tomorrow.", "Meet at nine a m tomorrow."),
    # phone numbers
    ("555-0123", "five five five, oh one two three"),
    ("+1 (555) 123-4567", "plus one, five five five, one two three, four five six seven"),
    ("(555) 123-4567", "five five five, one two three, four five six seven"),
    ("1-800-555-0123", "one, eight oh oh, five five five, oh one two three"),
    ("+44 20 7946 0958", "plus four four, two oh, seven nine four six, oh nine five eight"),
    # years
    ("in 1999", "in nineteen ninety-nine"),
    ("in 2005", "in two thousand five"),
    ("in 2024", "in twenty twenty-four"),
    ("in 1905", "in nineteen oh five"),
    ("1900", "nineteen hundred"),
    ("the 1990s", "the nineteen nineties"),
    # references
    ("Order AB12C9 shipped", "Order A B one two C nine shipped"),
    ("Ref ORD-2024-77", "Ref O R D, two zero two four, seven seven"),
    ("Gate B12", "Gate B one two"),
    ("iPhone15", "iPhone one five"),
    ("order #12345", "order number one two three four five"),
    ("#1", "number one"),
    ("007", "zero zero seven"),
    ("12345678901", "one two three four five six seven eight nine zero one"),
    # units
    ("3.5 km", "three point five kilometers"),
    ("1 kg", "one kilogram"),
    ("20°C", "twenty degrees Celsius"),
    ("98.6°F", "ninety-eight point six degrees Fahrenheit"),
    ("60 mph", "sixty miles per hour"),
    ("16 GB", "sixteen gigabytes"),
    ("500 ml", "five hundred milliliters"),
    ("50 sq ft", "fifty square feet"),
    ("5 lbs. of apples", "five pounds of apples"),
    # abbreviations
    ("Dr. Smith", "Doctor Smith"),
    ("Dr. Smith lives on Elm Dr.", "Doctor Smith lives on Elm Drive."),
    ("Visit St. Louis today.", "Visit Saint Louis today."),
    ("I live on Main St. Then I left.", "I live on Main Street. Then I left."),
    ("Mr. and Mrs. Jones", "Mister and Missus Jones"),
    ("Ask for Prof. Lee", "Ask for Professor Lee"),
    ("e.g. this", "for example this"),
    ("i.e. now", "that is now"),
    ("apples, pears, etc.", "apples, pears, et cetera."),
    ("Write to Mr. Brown, Apt. 4", "Write to Mister Brown, Apartment four"),
    ("No. 5", "number five"),
    ("no. I won't", "no. I won't"),
    # web and e-mail
    ("visit https://example.com/docs", "visit example dot com slash docs"),
    ("visit www.example.com.", "visit w w w dot example dot com."),
    ("mail bob@example.org today", "mail bob at example dot org today"),
    ("See example.com/a_b?c=1.", "See example dot com slash a underscore b question mark c equals one."),
    # symbols and fractions
    ("R&D", "R and D"),
    ("A & B", "A and B"),
    ("1 + 1 = 2", "one plus one equals two"),
    ("#hashtag", "hash hashtag"),
    ("1/2", "one half"),
    ("3/4", "three quarters"),
    ("5/8 inch", "five eighths inch"),
    ("2 1/2 cups", "two and a half cups"),
    ("½", "one half"),
    ("1½", "one and a half"),
    ("⅝", "five eighths"),
    ("24/7", "twenty-four seven"),
    # ranges
    ("10-12", "ten to twelve"),
    ("9am-5pm", "nine a m to five p m"),
    ("9 a.m.–5 p.m. daily", "nine a m to five p m daily"),
    ("$10-$20", "ten dollars to twenty dollars"),
    ("10–12 km", "ten to twelve kilometers"),
    ("2020-2024", "twenty twenty to twenty twenty-four"),
    ("10-12%", "ten to twelve percent"),
    # versions
    ("v2.1", "version two point one"),
    ("1.2.3", "one point two point three"),
]

PASS_THROUGH = [
    "Hello, world!",
    "Smith met O'Brien at the café.",
    "forty-two dollars and fifty cents",
    "Wait... what?! (Really?) Yes; no: maybe.",
    "Café Müller, naïve façade, Zürich.",
    "東京は晴れです。",
    "Привет, как дела?",
    "It may rain in May.",
    "mp",
    "",
    "   ",
]


@pytest.mark.parametrize(("written", "spoken"), CASES)
def test_each_kind_of_text_is_spoken_as_expected(written, spoken):
    """Every example of the table says exactly its spoken form."""
    assert normalize(written).text == spoken


def test_the_table_covers_the_brief():
    """At least sixty examples, and every category has one."""
    assert len(CASES) >= 60
    spoken = " ".join(s for _, s in CASES)
    for word in ("dollars", "euros", "pounds", "yen", "percent", "December", "p m", "oh", "kilometers",
                 "Doctor", "dot com", "at example", "plus", "half", "to twelve", "first", "nineteen"):
        assert word in spoken


@pytest.mark.parametrize("text", PASS_THROUGH)
def test_words_punctuation_and_other_languages_pass_unchanged(text):
    """Plain words, names, punctuation, spelled numbers, accents and other scripts come back as written."""
    result = normalize(text)
    assert result.text == text
    assert result.spans == tuple((i, i + 1) for i in range(len(text)))


def _doc_rows() -> list[tuple[str, str]]:
    rows = re.findall(r"^\| `(.+?)` \| (.*?) \|$", DOC.read_text(encoding="utf-8"), flags=re.M)
    assert len(rows) >= 40, "the examples table of docs/normalisation.md was not found"
    return rows


def test_the_documented_examples_are_what_normalize_returns():
    """docs/normalisation.md cannot drift: each row's spoken column is normalize's output."""
    for written, spoken in _doc_rows():
        assert normalize(written).text == spoken, written


def test_normalisation_can_be_turned_off_per_request():
    """normalize_for_speech(..., enabled=False) speaks the text as sent, with the identity map."""
    text = "Pay $5 by 12/03."
    assert normalize_for_speech(text, enabled=False) == Normalized.unchanged(text)
    assert normalize_for_speech(text, enabled=False).text == text
    assert normalize_for_speech(text, enabled=True) == normalize(text)


def test_a_spoken_span_maps_back_to_the_written_text():
    """The words of a replacement map to the whole written form, copied words to themselves."""
    result = normalize("Pay $42.50 now")
    start = result.text.index("forty-two")
    end = result.text.index(" now")
    assert result.to_source(start, end) == (4, 10)
    assert result.source[slice(*result.to_source(start, start + 3))] == "$42.50"
    assert result.to_source(0, 3) == (0, 3)
    assert result.to_source(end, end) == (10, 10)
    assert result.text[slice(*result.to_spoken(4, 10))] == "forty-two dollars and fifty cents"
    assert result.text[slice(*result.to_spoken(11, 14))] == "now"


def test_inserted_spaces_keep_words_apart():
    """A replacement between letters gets spaces: "R&D" is "R and D", "a+b" is "a plus b"."""
    assert normalize("a+b").text == "a plus b"
    assert normalize("x=1").text == "x equals one"


def test_the_alignment_of_the_text_as_sent_comes_from_the_spoken_alignment():
    """Timings of the spoken characters carry over: "$42.50" shares its words' time evenly."""
    result = normalize("Pay $42.50 now")
    chars, starts, ends = spread_timings(result.text, 0.0, 1000.0)
    source_chars, source_starts, source_ends = result.source_alignment(chars, starts, ends)
    assert source_chars == list("Pay $42.50 now")
    said = result.to_spoken(4, 10)
    money_start, money_end = starts[said[0]], ends[said[1] - 1]
    assert source_starts[4] == pytest.approx(money_start)
    assert source_ends[9] == pytest.approx(money_end)
    sixth = (money_end - money_start) / 6
    assert [e - s for s, e in zip(source_starts[4:10], source_ends[4:10])] == pytest.approx([sixth] * 6)
    assert source_ends[-1] == pytest.approx(1000.0)


def test_an_alignment_of_other_text_is_refused():
    """source_alignment needs the spoken text's own characters."""
    with pytest.raises(ValueError, match="not of this normalised text"):
        normalize("$5").source_alignment(list("$5"), [0.0, 1.0], [1.0, 2.0])


def test_a_rule_that_fails_leaves_its_text_as_written(monkeypatch, caplog):
    """A rule that raises on odd text costs nothing but its own replacement, and says so in the log."""

    def broken(match):
        raise ZeroDivisionError("a bug in a rule")

    monkeypatch.setattr(normalize_module, "RULES", (Rule("broken", re.compile(r"[0-9]+"), broken),))
    with caplog.at_level(logging.WARNING, logger="csmserve.text.normalize"):
        result = normalize("room 42 now")
    assert result.text == "room 42 now"
    assert "broken" in caplog.text


# --- Properties -------------------------------------------------------------------------------------

@contextmanager
def _no_rule_failures():
    """Fails the test if any rule raised (normalize would have logged it and carried on)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("csmserve.text.normalize")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    assert not records, [r.getMessage() for r in records]


def _assert_consistent(result: Normalized, text: str):
    assert result.source == text
    assert len(result.spans) == len(result.text)
    assert all(0 <= start < end <= len(text) for start, end in result.spans)
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(result.spans, result.spans[1:]))
    covered = {i for start, end in result.spans for i in range(start, end)}
    # Nothing is dropped, not even whitespace or punctuation: every written character is said by something.
    assert covered == set(range(len(text)))


WRITTEN_CHARS = st.sampled_from(list("0123456789$€£¥₹%.,:;/-–+()#&@=°½ \n aAbBeEkKmMpPsStTxXgGlLhH'\"!?"))
TOKENS = [written for written, _ in CASES] + ["Dr.", "St.", "e.g.", "3.", "$", "-", "1/0", "0/0", "99/99"]
PLAIN_WORDS = ["hello", "total", "Smith", "café", "naïve", "東京", "Zürich", "price", "forty-two", "call"]
# Letters, marks, spaces and punctuation of any script; no digits, symbols, or the signs rules start from.
NO_DIGITS_OR_SYMBOLS = st.characters(exclude_categories=("Nd", "No", "Sc", "Sm", "So", "Cs")).filter(
    lambda c: c not in ".#&@%"
)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120))
def test_any_text_is_normalised_without_error_and_with_a_consistent_map(text):
    """Arbitrary Unicode never raises, and the map is complete, in range and never goes backwards."""
    with _no_rule_failures():
        _assert_consistent(normalize(text), text)


@settings(max_examples=400, deadline=None)
@given(st.text(WRITTEN_CHARS, max_size=60))
def test_digits_and_symbols_in_any_mix_never_break_a_rule(text):
    """Dense mixes of digits, currency signs, dots, slashes and dashes: no rule raises, the map holds."""
    with _no_rule_failures():
        _assert_consistent(normalize(text), text)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(PLAIN_WORDS), st.sampled_from(TOKENS)), max_size=12))
def test_no_word_is_ever_dropped(tokens):
    """Plain words among prices, dates and codes all survive, in order."""
    text = " ".join(tokens)
    with _no_rule_failures():
        result = normalize(text)
    _assert_consistent(result, text)
    spoken_words = iter(result.text.split())
    for token in tokens:
        if token in PLAIN_WORDS:
            assert any(word == token for word in spoken_words), (token, result.text)


@settings(max_examples=200, deadline=None)
@given(st.text(NO_DIGITS_OR_SYMBOLS, max_size=80))
def test_text_without_digits_or_symbols_comes_back_unchanged(text):
    """Words, names, punctuation and any script pass through exactly, when they hold no digit or symbol."""
    assert normalize(text).text == text


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=60), st.floats(min_value=1.0, max_value=60_000.0))
def test_both_alignments_hold_their_own_characters(text, duration_ms):
    """normalized_alignment holds the spoken text, alignment the text as sent; times never go back."""
    result = normalize(text)
    chars, starts, ends = spread_timings(result.text, 0.0, duration_ms)
    assert "".join(chars) == result.text
    source_chars, source_starts, source_ends = result.source_alignment(chars, starts, ends)
    assert "".join(source_chars) == text
    assert len(source_starts) == len(source_ends) == len(text)
    assert all(s <= e for s, e in zip(source_starts, source_ends))
    assert all(a <= b + 1e-9 for a, b in zip(source_starts, source_starts[1:]))
    if text:
        assert source_ends[-1] == pytest.approx(duration_ms)


@settings(max_examples=150, deadline=None)
@given(st.text(WRITTEN_CHARS, max_size=60), st.data())
def test_parts_between_breaks_concatenate_back_to_the_whole(text, data):
    """Cut at any breaks, the parts add back to the whole: spoken text, written text and the map."""
    result = normalize(text)
    breaks = result.breaks()
    assert breaks[0] == 0 and breaks[-1] == len(result.text) and breaks == sorted(set(breaks))
    cuts = sorted(set(data.draw(st.lists(st.sampled_from(breaks), max_size=4))) | {0, len(result.text)})
    parts = [result.part(a, b) for a, b in pairwise(cuts)] or [result.part(0, 0)]
    joined = parts[0]
    for part in parts[1:]:
        joined = joined + part
    assert joined == result


def test_a_part_keeps_a_replacement_whole():
    """A cut inside "forty-two dollars and fifty cents" is refused; around it the part says "$42.50"."""
    result = normalize("Pay $42.50 now")
    start, end = result.to_spoken(4, 10)
    assert start in result.breaks() and end in result.breaks() and start + 1 not in result.breaks()
    assert result.part(start, end).source == "$42.50"
    assert result.part(0, start).source == "Pay " and result.part(end, len(result.text)).source == " now"
    with pytest.raises(ValueError, match="cuts a replacement"):
        result.part(start + 1, end)


def test_unchanged_whitespace_before_a_sentence_adds_to_its_map():
    """A gap then a sentence: both texts joined, the sentence's spans shifted past the gap."""
    joined = Normalized.unchanged("  ") + normalize("$5.")
    assert joined.source == "  $5." and joined.text == "  five dollars."
    assert joined.to_source(2, 14) == (2, 4) and joined.to_source(0, 1) == (0, 1)
