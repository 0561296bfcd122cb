"""English words for numbers: cardinals, ordinals, years, digits, fractions, plurals.

The language comes from libraries: ``inflect`` (cardinals in American style, without "and" or
commas; ordinals; plurals) and ``num2words`` (years). This module only chooses their options and
puts the pieces together. Every function takes digits as they were written (``"1,234"``, ``"-5"``,
``"3.50"``) and returns lower-case words, apart from spelled letters, which are capitals.
"""

from __future__ import annotations

import functools
import unicodedata

#: Digits one by one. Phone numbers say "oh" for 0; everything else says "zero".
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: Above this many digits an integer is read digit by digit (inflect stops at decillions).
MAX_CARDINAL_DIGITS = 36


@functools.cache
def _inflect():
    # inflect takes over a second to import: only text that needs words pays for it.
    import inflect

    return inflect.engine()


def cardinal(number: str) -> str:
    """``"1,234"`` -> "one thousand two hundred thirty-four"; ``"-3.50"`` -> "minus three point five zero".

    A leading ``-`` or ``−`` is "minus"; decimals are read digit by digit after "point".
    """
    number = number.replace(",", "")
    sign = "minus " if number[:1] in ("-", "−") else ""
    number = number.lstrip("-−")
    whole, _, fraction = number.partition(".")
    if len(whole) > MAX_CARDINAL_DIGITS:
        words = digits(whole)
        return sign + (words + " point " + digits(fraction) if fraction else words)
    return sign + _inflect().number_to_words(number, andword="", comma="", zero="zero")


def ordinal(number: str) -> str:
    """``"22"`` -> "twenty-second"; ``"1,000"`` -> "one thousandth"."""
    return _inflect().ordinal(cardinal(number))


def year(number: str) -> str:
    """A year as it is said: 1999 -> "nineteen ninety-nine", 1905 -> "nineteen oh five",
    2005 -> "two thousand five", 2024 -> "twenty twenty-four", 1900 -> "nineteen hundred"."""
    from num2words import num2words

    # num2words says "two thousand and five" and "oh-five"; American speech drops the "and".
    return num2words(int(number), lang="en", to="year").replace(" and ", " ").replace("oh-", "oh ")


def two_digit_year(number: str) -> str:
    """The last two digits of a year: "25" -> "twenty-five", "05" -> "oh five", "00" -> "oh oh"."""
    if number[0] == "0":
        return "oh " + ("oh" if number[1] == "0" else DIGITS[int(number[1])])
    return cardinal(number)


def digits(text: str, zero: str = "zero") -> str:
    """Each digit of ``text`` as a word, separated by spaces; ``zero`` is the word for 0."""
    return " ".join(zero if c == "0" else DIGITS[int(c)] for c in text if "0" <= c <= "9")


def spell(text: str) -> str:
    """Letters and digits one by one: "AB12" -> "A B one two" (letters as capitals, 0 is "zero")."""
    return " ".join(DIGITS[int(c)] if "0" <= c <= "9" else c.upper() for c in text if c.isalnum())


def plural(noun: str, count: str) -> str:
    """``noun`` for ``count`` of it: singular for exactly one ("1", "-1"), plural otherwise."""
    return noun if count.lstrip("-−") == "1" else _inflect().plural(noun)


def plural_of_last_word(words: str) -> str:
    """"nineteen ninety" -> "nineteen nineties" (decades: "the 1990s")."""
    head, _, last = words.rpartition(" ")
    return (head + " " if head else "") + _inflect().plural(last)


def fraction(numerator: str, denominator: str, after_whole: bool = False) -> str:
    """1/2 -> "one half", 3/4 -> "three quarters", 5/8 -> "five eighths".

    ``after_whole`` is for mixed numbers: "1 1/2" is "one and a half", so a numerator of one is "a".
    """
    names = {"2": "half", "4": "quarter"}
    name = names.get(denominator.lstrip("0")) or ordinal(denominator)
    count = "a" if after_whole and numerator.lstrip("0") == "1" else cardinal(numerator)
    return count + " " + plural(name, numerator)


def vulgar_fraction(char: str) -> tuple[str, str] | None:
    """``"½"`` -> ``("1", "2")``: the parts of a one-character fraction, from Unicode's decomposition."""
    tag, *codes = unicodedata.decomposition(char).split() or [""]
    if tag != "<fraction>":
        return None
    numerator, _, denominator = "".join(chr(int(code, 16)) for code in codes).partition("\u2044")
    return numerator, denominator
