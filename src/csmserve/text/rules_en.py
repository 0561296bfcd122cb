"""The English rules of text normalisation: what each pattern of written text sounds like.

:data:`RULES` is the table, in priority order: where two rules match overlapping text, the earlier
rule wins (a phone number is not read as a range, a date not as a fraction). Each rule is a compiled
regex and a function from its match to the spoken words, or ``None`` when the match turns out not to
be that kind of thing (13/45 is no date), which leaves the text to the rules after it.

Choices (``docs/normalisation.md``): numeric dates are American (12/03 is December third); phone
numbers say "oh" for 0, references "zero" (an O there could be the letter); a four-digit number from
1100 to 2099 is a year; the words are American English. Only ASCII digits count as digits: other
scripts' numerals are left as written.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from csmserve.text import words_en as words


@dataclass(frozen=True)
class Rule:
    """One kind of written text: ``pattern`` finds it, ``speak`` says it (None: not this kind after all)."""

    name: str
    pattern: re.Pattern[str]
    speak: Callable[[re.Match[str]], str | None]


def _compile(pattern: str, flags: int = 0) -> re.Pattern[str]:
    # \d would also match other scripts' digits ("٣", "²"), which the words cannot say: ASCII only.
    return re.compile(pattern.replace(r"\d", "[0-9]"), flags)


def _group(match: re.Match[str], name: str) -> str | None:
    """A named group that only some of a rule's patterns have."""
    return match.groupdict().get(name)


# A number as written: 1,234,567 or 1234, with decimals; or .5. It starts and ends outside words
# and other numbers.
NUMBER = r"(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
START = r"(?<![\w.])"
END = r"(?![\w])(?!\.\d)"
# What follows the last word of a sentence: the end of the text, or a space and a capital.
_SENTENCE_END = re.compile(r"\s*$|\s+[\"'“‘(\[]*[A-Z]")


def _closing_dot(match: re.Match[str]) -> str:
    """"." when the match ends in a full stop that also ends the sentence ("... at 5 p.m."), else ""."""
    ends_sentence = _SENTENCE_END.match(match.string, match.end()) is not None
    return "." if match.group().endswith(".") and ends_sentence else ""


# --- Set phrases ---------------------------------------------------------------------------------
PHRASES = {"24/7": "twenty-four seven"}


def say_phrase(match: re.Match[str]) -> str:
    """24/7 -> "twenty-four seven"."""
    return PHRASES[match.group()]


PHRASE = _compile(r"(?<![\w./])(?:" + "|".join(map(re.escape, PHRASES)) + r")(?![\w/])")


# --- Web addresses and e-mail ----------------------------------------------------------------------
_ADDRESS_SYMBOLS = {
    ".": "dot", "/": "slash", "-": "dash", "_": "underscore", ":": "colon", "?": "question mark",
    "=": "equals", "&": "and", "#": "hash", "%": "percent", "@": "at", "~": "tilde", "+": "plus",
}
_ADDRESS_PIECE = re.compile(r"[^\W\d_]+|[0-9]+|.")
_TLDS = "com|org|net|edu|gov|io|ai|dev|app|co|uk|us|ca|de|fr|eu|info|biz|me|tv"


def say_address(match: re.Match[str]) -> str:
    """example.com/docs -> "example dot com slash docs"; bob@example.org -> "bob at example dot org".

    The scheme (https://) and a final slash are not said; digits are said one by one.
    """
    address = re.sub(r"^[a-z]+://", "", match.group(), flags=re.I).rstrip("/")
    spoken = []
    for piece in _ADDRESS_PIECE.findall(address):
        if piece.isascii() and piece.isdigit():
            spoken.append(words.digits(piece))
        elif piece.lower() == "www":
            spoken.append("w w w")
        elif not piece.isspace():
            spoken.append(_ADDRESS_SYMBOLS.get(piece, piece))
    return " ".join(spoken)


EMAIL = _compile(r"(?<![\w.+-])[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}(?![\w-])")
URL = _compile(
    rf"""(?<![\w.@/-])
    (?:https?://|www\.|(?=(?:[a-z0-9-]+\.)+(?:{_TLDS})\b))   # a scheme, www., or a known domain
    [^\s<>"'`]*[^\s<>"'`.,;:!?)\]]                            # up to, not including, punctuation after it
    """,
    re.X | re.I,
)


# --- Phone numbers ----------------------------------------------------------------------------------
def say_phone(match: re.Match[str]) -> str | None:
    """+1 (555) 123-4567 -> "plus one, five five five, one two three, four five six seven"."""
    groups = re.findall(r"[0-9]+", match.group())
    if sum(map(len, groups)) < 7:
        return None  # "+1 5" is arithmetic, not a phone number
    spoken = ", ".join(words.digits(group, zero="oh") for group in groups)
    return ("plus " if match.group().startswith("+") else "") + spoken


PHONE = _compile(
    r"""(?<![\w+.-])
    (?:\+\d{1,3}[\s.-]?\(?\d{1,5}\)?(?:[\s.-]\(?\d{1,5}\)?){1,4}             # +44 20 7946 0958
    |(?:1[\s.-])?(?:\(\d{3}\)\s?\d{3}[-.]|\d{3}-\d{3}-|\d{3}\.\d{3}\.)\d{4}   # (555) 123-4567, 1-800-555-0123
    |\d{3}-\d{4})                                                            # 555-0123
    (?![\w-])(?!\.\d)""",
    re.X,
)


# --- Dates ---------------------------------------------------------------------------------------------
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
_MONTH = (r"(?P<month>Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?"
          r"|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)(?![a-z])\.?")
_DAY = r"(?P<day>[12]\d|3[01]|0?[1-9])(?:st|nd|rd|th)?(?!\w)"
_YEAR = r"(?P<year>\d{4})(?!\w)"


def _date(month: int, day: int, year: str | None) -> str | None:
    """"December third, twenty twenty-five", or None for a day the month does not have."""
    days = 29 if month == 2 else 30 if month in (4, 6, 9, 11) else 31
    if not (1 <= month <= 12 and 1 <= day <= days):
        return None
    spoken = f"{MONTHS[month - 1]} {words.ordinal(str(day))}"
    if year:
        spoken += ", " + (words.year(year) if len(year) == 4 else words.two_digit_year(year))
    return spoken


def _month_number(written: str) -> int:
    return next(i for i, name in enumerate(MONTHS, 1) if name.startswith(written.rstrip(".")[:3]))


def say_numeric_date(match: re.Match[str]) -> str | None:
    """12/03/2025 and 2025-12-03 -> "December third, twenty twenty-five" (month first, as in the US;
    day first only where the first number cannot be a month: 25/12/2025)."""
    month, day, year = match["month"], match["day"], match["year"]
    if not year and (match["sep"] == "-" or max(len(month), len(day)) < 2):
        return None  # 10-12 is a range and 3/4 a fraction; 12/03 and 1/15 are dates
    if int(month) > 12:
        month, day = day, month
    return _date(int(month), int(day), year)


def say_month_day(match: re.Match[str]) -> str | None:
    """Dec 3, December 3rd, 2025 -> "December third, twenty twenty-five"."""
    return _date(_month_number(match["month"]), int(match["day"]), match["year"])


def say_day_month(match: re.Match[str]) -> str | None:
    """3 December 2025 -> "the third of December, twenty twenty-five"."""
    spoken = _date(_month_number(match["month"]), int(match["day"]), None)
    if spoken is None:
        return None
    month, day = spoken.split(" ", 1)
    year = match["year"]
    return f"{match['the'] or 'the'} {day} of {month}" + (", " + words.year(year) if year else "")


def say_month_year(match: re.Match[str]) -> str:
    """Dec 2025 -> "December twenty twenty-five"."""
    return f"{MONTHS[_month_number(match['month']) - 1]} {words.year(match['year'])}"


ISO_DATE = _compile(
    r"(?<![\w./-])(?P<year>\d{4})(?P<sep>[-/])(?P<month>0[1-9]|1[0-2])(?P=sep)"
    r"(?P<day>0[1-9]|[12]\d|3[01])(?![\w/-])"
)
US_DATE = _compile(
    r"(?<![\w./-])(?P<month>[0-3]?\d)(?P<sep>[/-])(?P<day>[0-3]?\d)"
    r"(?:(?P=sep)(?P<year>\d{4}|\d{2}))?(?![\w/-])(?!\.\d)"
)
MONTH_DAY = _compile(rf"\b{_MONTH}\s+{_DAY}(?:,?\s+{_YEAR})?")
DAY_MONTH = _compile(rf"(?:\b(?P<the>[Tt]he)\s+)?{START}{_DAY}\s+(?:of\s+)?{_MONTH}(?:,?\s+{_YEAR})?")
MONTH_YEAR = _compile(rf"\b{_MONTH}\s+{_YEAR}")


# --- Times ------------------------------------------------------------------------------------------------
_AM_PM = r"(?P<ampm>[aApP])\.?[mM](?!\w)\.?"


def say_time(match: re.Match[str]) -> str:
    """3:30 pm -> "three thirty p m"; 15:45 -> "fifteen forty-five"; 9am -> "nine a m";
    10:00 -> "ten o'clock"; 15:00 -> "fifteen hundred"; 3:05 -> "three oh five"."""
    hour, minute, second, ampm = (_group(match, name) for name in ("hour", "minute", "second", "ampm"))
    spoken = words.cardinal(str(int(hour)))
    if minute and minute != "00":
        spoken += " " + ("oh " + words.DIGITS[int(minute[1])] if minute[0] == "0" else words.cardinal(minute))
    elif minute and not ampm:
        spoken += " o'clock" if int(hour) <= 12 else " hundred"
    if second:
        count = str(int(second))
        spoken += f" and {words.cardinal(count)} {words.plural('second', count)}"
    if ampm:
        spoken += f" {ampm.lower()} m" + _closing_dot(match)
    return spoken


CLOCK = _compile(
    rf"(?<![\w.:])(?P<hour>[01]?\d|2[0-4]):(?P<minute>[0-5]\d)(?::(?P<second>[0-5]\d))?"
    rf"(?:\s?{_AM_PM})?(?![\w:])(?!\.\d)"
)
HOUR = _compile(rf"(?<![\w.:])(?P<hour>1[0-2]|0?[1-9])\s?{_AM_PM}")


# --- Money ----------------------------------------------------------------------------------------------
#: code -> (one, many, one hundredth, many hundredths); no hundredths: the decimals are read as such.
CURRENCIES = {
    "USD": ("dollar", "dollars", "cent", "cents"),
    "EUR": ("euro", "euros", "cent", "cents"),
    "GBP": ("pound", "pounds", "penny", "pence"),
    "JPY": ("yen", "yen", None, None),
    "CNY": ("yuan", "yuan", None, None),
    "INR": ("rupee", "rupees", "paisa", "paise"),
    "CAD": ("Canadian dollar", "Canadian dollars", "cent", "cents"),
    "AUD": ("Australian dollar", "Australian dollars", "cent", "cents"),
    "CHF": ("Swiss franc", "Swiss francs", "centime", "centimes"),
}
CURRENCY_SYMBOLS = {"$": "USD", "€": "EUR", "£": "GBP", "¥": "JPY", "₹": "INR"}
SCALES = {"k": "thousand", "m": "million", "mm": "million", "mn": "million", "b": "billion", "bn": "billion",
          "t": "trillion", "tn": "trillion"}


def say_money(match: re.Match[str]) -> str:
    """$42.50 -> "forty-two dollars and fifty cents"; $1.5M -> "one point five million dollars"; 100 EUR."""
    code = _group(match, "code") or CURRENCY_SYMBOLS[match["symbol"]]
    one, many, cent, cents = CURRENCIES[code]
    sign = "minus " if match["sign"] else ""
    amount = match["amount"].replace(",", "")
    if match["scale"]:
        scale = SCALES.get(match["scale"].lower(), match["scale"])
        return f"{sign}{words.cardinal(amount)} {scale} {many}"
    whole, _, decimals = amount.partition(".")
    if not cent or not decimals or len(decimals) > 2:
        return f"{sign}{words.cardinal(amount)} {one if amount == '1' else many}"
    whole, hundredths = str(int(whole or "0")), str(int(decimals.ljust(2, "0")))
    main = f"{words.cardinal(whole)} {one if whole == '1' else many}"
    change = f"{words.cardinal(hundredths)} {cent if hundredths == '1' else cents}"
    if hundredths == "0":
        return sign + main
    return sign + (change if whole == "0" else f"{main} and {change}")


_SIGN = r"(?<![\w.])(?P<sign>[-−])?"
# $1.5M, $3k, $2bn; or £3 million.
_SCALE = (r"(?:\s?(?P<scale>(?<=\d)(?:[kKmMbBtT]|bn|mn|MM|tn)"
          r"|(?<=\s)(?:thousand|million|billion|trillion)))?(?!\w)")
_SYMBOL = "[" + "".join(CURRENCY_SYMBOLS) + "]"
_CODE = "(?P<code>" + "|".join(CURRENCIES) + r")\b"
MONEY = _compile(rf"{_SIGN}(?P<symbol>{_SYMBOL})\s?(?P<amount>{NUMBER}){_SCALE}(?!\.\d)")
MONEY_CODE_FIRST = _compile(rf"{_SIGN}{_CODE}\s?(?P<amount>{NUMBER}){_SCALE}(?!\.\d)")
MONEY_CODE_AFTER = _compile(rf"{_SIGN}(?P<amount>{NUMBER}){_SCALE}\s?{_CODE}")


# --- Percentages and quantities -------------------------------------------------------------------------
def say_percent(match: re.Match[str]) -> str:
    """50% -> "fifty percent"; -2.5% -> "minus two point five percent"."""
    return words.cardinal(match["number"]) + " percent"


PERCENT = _compile(rf"{START}(?P<number>[-−]?{NUMBER})\s?%")

#: written unit -> its name for one of it (plurals come from inflect).
UNITS = {
    "km": "kilometer", "m": "meter", "cm": "centimeter", "mm": "millimeter", "mi": "mile", "ft": "foot",
    "yd": "yard", "kg": "kilogram", "g": "gram", "mg": "milligram", "lb": "pound", "lbs": "pound",
    "oz": "ounce", "ml": "milliliter", "mL": "milliliter", "l": "liter", "L": "liter", "gal": "gallon",
    "mph": "mile per hour", "km/h": "kilometer per hour", "kph": "kilometer per hour",
    "m/s": "meter per second",
    "°C": "degree Celsius", "°F": "degree Fahrenheit", "°": "degree", "KB": "kilobyte", "kB": "kilobyte",
    "MB": "megabyte", "GB": "gigabyte", "TB": "terabyte", "Mbps": "megabit per second",
    "Gbps": "gigabit per second", "Hz": "hertz", "kHz": "kilohertz", "MHz": "megahertz", "GHz": "gigahertz",
    "W": "watt", "kW": "kilowatt", "kWh": "kilowatt hour", "mAh": "milliamp hour", "ms": "millisecond",
    "sec": "second", "secs": "second", "min": "minute", "mins": "minute", "hr": "hour", "hrs": "hour",
    "sq ft": "square foot",
}
# Longest first, so that "km/h" is tried before "km" and "mph" before "m"; a unit may end in a dot.
_UNIT = "(?:" + "|".join(re.escape(u) for u in sorted(UNITS, key=len, reverse=True)) + r")(?![\w/°])\.?"


def say_quantity(match: re.Match[str]) -> str:
    """3.5 km -> "three point five kilometers"; 1 kg -> "one kilogram"; 20°C -> "twenty degrees Celsius"."""
    number, unit = match["number"], match["unit"].rstrip(".")
    return f"{words.cardinal(number)} {words.plural(UNITS[unit], number)}" + _closing_dot(match)


QUANTITY = _compile(rf"{START}(?P<number>[-−]?{NUMBER})\s?(?P<unit>{_UNIT})")


# --- Ranges -----------------------------------------------------------------------------------------------
# One end of a range: 9am, 9:30 p.m., 15:45, $10, $1.5M, 10, 10%.
_RANGE_END = (rf"(?:(?:1[0-2]|0?[1-9])(?::[0-5]\d)?\s?[aApP]\.?[mM]\.?|\d{{1,2}}:[0-5]\d"
              rf"|{_SYMBOL}{NUMBER}[kKmMbB]?|{NUMBER}%?)")


def _say_alone(text: str) -> str | None:
    """One end of a range, said by the first rule that reads all of it, without a closing full stop."""
    for rule in RANGE_ENDS:
        match = rule.pattern.fullmatch(text)
        if match and (spoken := rule.speak(match)) is not None:
            return spoken.rstrip(".")
    return None


def say_range(match: re.Match[str]) -> str | None:
    """10-12 -> "ten to twelve"; 9am-5pm -> "nine a m to five p m";
    10–12 km -> "ten to twelve kilometers"."""
    low, high = _say_alone(match["low"]), _say_alone(match["high"])
    if low is None or high is None:
        return None
    return f"{low} to {high}" + _closing_dot(match)


RANGE = _compile(
    rf"(?<![\w.,/-])(?P<low>{_RANGE_END})(?:-|\s?[–—]\s?)"
    rf"(?P<high>{_RANGE_END}(?:\s?{_UNIT})?)(?![\w-])(?!\.\d)"
)


# --- Fractions, ordinals, years --------------------------------------------------------------------------
def say_fraction(match: re.Match[str]) -> str | None:
    """1/2 -> "one half"; 3 1/2 and 3½ -> "three and a half"; ⅝ -> "five eighths"."""
    vulgar = _group(match, "vulgar")
    parts = words.vulgar_fraction(vulgar) if vulgar else (match["numerator"], match["denominator"])
    if parts is None or int(parts[1]) < 2:
        return None
    whole = match["whole"]
    spoken = words.fraction(*parts, after_whole=bool(whole))
    return f"{words.cardinal(whole)} and {spoken}" if whole else spoken


FRACTION = _compile(
    r"(?<![\w./])(?:(?P<whole>\d+)\s)?(?P<numerator>\d{1,3})/(?P<denominator>\d{1,3})(?![\w/])(?!\.\d)"
)
VULGAR_FRACTION = _compile(r"(?<![\w.])(?:(?P<whole>\d+)\s?)?(?P<vulgar>[\u00bc-\u00be\u2150-\u215e])")


def say_ordinal(match: re.Match[str]) -> str:
    """1st -> "first"; 22nd -> "twenty-second"; 1,000th -> "one thousandth"."""
    return words.ordinal(match["number"])


ORDINAL = _compile(rf"{START}(?P<number>\d{{1,3}}(?:,\d{{3}})+|\d+)(?:st|nd|rd|th|ST|ND|RD|TH)(?!\w)")


def say_year(match: re.Match[str]) -> str:
    """1999 -> "nineteen ninety-nine"; 2005 -> "two thousand five"; 1990s -> "nineteen nineties"."""
    spoken = words.year(match["year"])
    return words.plural_of_last_word(spoken) if match["decade"] else spoken


# Not after a minus sign: -1999 is a number.
YEAR = _compile(r"(?<![\w.,$€£¥₹-])(?P<year>1[1-9]\d\d|20\d\d)(?P<decade>'?s)?(?![\w])(?!\.\d)(?!,\d)")


# --- Versions, references, digit strings, numbers --------------------------------------------------------
def say_version(match: re.Match[str]) -> str:
    """v2.1 -> "version two point one"; 1.2.3 -> "one point two point three"."""
    spoken = " point ".join(words.cardinal(part) for part in match["numbers"].split("."))
    return ("version " if match.group()[0] in "vV" else "") + spoken


VERSION = _compile(r"(?<![\w.])[vV](?P<numbers>\d+(?:\.\d+)*)(?![\w])(?!\.\d)")
DOTTED_NUMBER = _compile(r"(?<![\w.])(?P<numbers>\d+(?:\.\d+){2,})(?![\w])(?!\.\d)")


def _say_code(code: str) -> str:
    """AB12C9 -> "A B one two C nine"; ORD-2024-77 -> "O R D, two zero two four, seven seven".

    Letters and digits one by one, hyphens as short pauses; a run of four or more letters that is
    not all capitals stays a word ("iPhone15" -> "iPhone one five").
    """
    groups = []
    for group in code.split("-"):
        runs = re.findall(r"[A-Za-z]+|[0-9]+", group)
        word = [run.isalpha() and len(run) >= 4 and not run.isupper() for run in runs]
        said = (run if keep else words.spell(run) for run, keep in zip(runs, word))
        groups.append(" ".join(said))
    return ", ".join(g for g in groups if g)


def say_reference(match: re.Match[str]) -> str | None:
    """An order or reference code of letters and digits (:func:`_say_code`); None for words and numbers."""
    code = match.group()
    if not (re.search(r"[0-9]", code) and re.search(r"[A-Za-z]", code)):
        return None
    return _say_code(code)


REFERENCE = _compile(r"(?<![\w.-])[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*(?![\w-])(?!\.\d)")


def say_hash_number(match: re.Match[str]) -> str | None:
    """#7 -> "number seven"; #12345 -> "number one two three four five"; #A12 -> "number A one two"."""
    code = match["code"]
    if code.isdigit():
        return "number " + (words.cardinal(code) if len(code) <= 3 else words.digits(code))
    return "number " + _say_code(code) if re.search(r"[0-9]", code) else None  # a hashtag stays "hash"


HASH_NUMBER = _compile(r"(?<![\w#])#\s?(?P<code>[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*)(?![\w-])(?!\.\d)")


def say_digit_string(match: re.Match[str]) -> str:
    """007 -> "zero zero seven"; ten or more digits without commas are read one by one."""
    return words.digits(match.group())


DIGIT_STRING = _compile(rf"{START}(?:0\d+|\d{{10,}}){END}(?!,\d)")


def say_number(match: re.Match[str]) -> str:
    """42 -> "forty-two"; 1,234,567; -5 -> "minus five"; 3.14 -> "three point one four"."""
    return words.cardinal(match.group())


CARDINAL = _compile(rf"{START}[-−]?{NUMBER}{END}")


# --- Abbreviations and symbols ----------------------------------------------------------------------------
#: written (lower case, no dot) -> said. "Dr." and "St." depend on what follows (say_abbreviation).
ABBREVIATIONS = {
    "mr": "Mister", "mrs": "Missus", "ms": "Miz", "prof": "Professor", "jr": "Junior", "sr": "Senior",
    "vs": "versus", "etc": "et cetera", "e.g": "for example", "i.e": "that is", "approx": "approximately",
    "ave": "Avenue", "blvd": "Boulevard", "rd": "Road", "apt": "Apartment", "mt": "Mount",
    "dept": "Department", "inc": "Incorporated", "ltd": "Limited", "tel": "telephone", "ext": "extension",
    "fig": "figure", "no": "number", "nos": "numbers",
}
_BEFORE_NAME = {"dr": ("Drive", "Doctor"), "st": ("Street", "Saint")}
#: Abbreviations that may end a sentence: there, the full stop stays.
_MAY_END_SENTENCE = {"etc", "jr", "sr", "inc", "ltd", "ave", "blvd", "rd", "dr", "st"}
_NAME_FOLLOWS = re.compile(r"\s+[A-Z]")
_NUMBER_FOLLOWS = re.compile(r"\s?[0-9]")


def _after_place_name(match: re.Match[str]) -> bool:
    """True after "Main" or "5th" in mid-sentence ("on Main St."); a sentence's first word says nothing,
    and neither does the end of the sentence before."""
    before = match.string[: match.start()].rstrip()
    word = before.split()[-1] if before.split() else ""
    rest = before[: len(before) - len(word)].rstrip()
    capital = word[:1].isupper() or word[:1].isdigit()
    return capital and word[-1] not in ".!?" and bool(rest) and rest[-1] not in ".!?"


def say_abbreviation(match: re.Match[str]) -> str | None:
    """Mr. -> "Mister", e.g. -> "for example"; No. 5 -> "number" (but "no." is the word no).

    Dr. and St. before a name are "Doctor" and "Saint" (Dr. Smith, St. Louis), after a place name
    or with no name after them "Drive" and "Street" (on Elm Dr., on Main St. Then ...).
    """
    written = match["word"]
    key = written.lower()
    if key in ("no", "nos") and not _NUMBER_FOLLOWS.match(match.string, match.end()):
        return None
    name_follows = _NAME_FOLLOWS.match(match.string, match.end()) is not None
    title = key in _BEFORE_NAME and name_follows and not _after_place_name(match)
    spoken = _BEFORE_NAME[key][title] if key in _BEFORE_NAME else ABBREVIATIONS[key]
    if written.islower():
        spoken = spoken.lower()
    return spoken + (_closing_dot(match) if key in _MAY_END_SENTENCE and not title else "")


_ABBREVIATION = "|".join(re.escape(a) for a in sorted([*ABBREVIATIONS, *_BEFORE_NAME], key=len, reverse=True))
ABBREVIATION = _compile(rf"(?<![\w.])(?P<word>{_ABBREVIATION})\.(?!\w)", re.I)

#: A symbol on its own (# before a number is HASH_NUMBER's "number").
SYMBOLS = {
    "&": "and", "@": "at", "+": "plus", "=": "equals", "%": "percent", "#": "hash", "°": "degrees",
    "×": "times",
}


def say_symbol(match: re.Match[str]) -> str:
    """& -> "and", @ -> "at", + -> "plus", = -> "equals", % -> "percent", # -> "hash"."""
    return SYMBOLS[match.group()]


SYMBOL = _compile("[" + re.escape("".join(SYMBOLS)) + "]")


# --- The table ----------------------------------------------------------------------------------------------
_TIME_RULES = (Rule("time", CLOCK, say_time), Rule("time", HOUR, say_time))
_MONEY_RULES = (
    Rule("money", MONEY, say_money),
    Rule("money", MONEY_CODE_FIRST, say_money),
    Rule("money", MONEY_CODE_AFTER, say_money),
)
#: What one end of a range may be, in the order tried.
RANGE_ENDS = (
    *_TIME_RULES, _MONEY_RULES[0],
    Rule("percent", PERCENT, say_percent),
    Rule("quantity", QUANTITY, say_quantity),
    Rule("year", YEAR, say_year),
    Rule("number", CARDINAL, say_number),
)
#: Every rule, earliest first: an earlier rule's match wins over a later one it overlaps.
RULES = (
    Rule("phrase", PHRASE, say_phrase),
    Rule("email", EMAIL, say_address),
    Rule("url", URL, say_address),
    Rule("phone", PHONE, say_phone),
    Rule("date", ISO_DATE, say_numeric_date),
    Rule("date", US_DATE, say_numeric_date),
    Rule("date", MONTH_DAY, say_month_day),
    Rule("date", DAY_MONTH, say_day_month),
    Rule("date", MONTH_YEAR, say_month_year),
    Rule("range", RANGE, say_range),
    *_TIME_RULES,
    *_MONEY_RULES,
    Rule("percent", PERCENT, say_percent),
    Rule("quantity", QUANTITY, say_quantity),
    Rule("fraction", FRACTION, say_fraction),
    Rule("fraction", VULGAR_FRACTION, say_fraction),
    Rule("ordinal", ORDINAL, say_ordinal),
    Rule("version", VERSION, say_version),
    Rule("version", DOTTED_NUMBER, say_version),
    Rule("year", YEAR, say_year),
    Rule("reference", REFERENCE, say_reference),
    Rule("hash number", HASH_NUMBER, say_hash_number),
    Rule("digits", DIGIT_STRING, say_digit_string),
    Rule("number", CARDINAL, say_number),
    Rule("abbreviation", ABBREVIATION, say_abbreviation),
    Rule("symbol", SYMBOL, say_symbol),
)
