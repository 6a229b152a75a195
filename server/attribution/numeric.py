"""Numeric consistency: a passage supports a sentence only if it states each of the sentence's values.

Support is otherwise similarity (server/attribution/support.py): a sentence close to a passage in words and
meaning can still carry a value the passage does not state ("covered for 2,000 years" against "five years or
2,000 cycles"). Similarity cannot tell those apart, so each value is checked here, exactly:
- a value is a number written in digits (2,000 / 3.5 / 12%) or as a common number word ("five",
  "twenty-five"), with the unit that follows it when that is a known unit (years, days, %, EUR, mg, ...);
- the passage must state the number; when the sentence gives a known unit, one of the passage's mentions of
  that number must carry it (within the next few words, or just before: "EUR 120"), or carry no word at all
  (a table cell, the end of a sentence). A mention with only a different unit does not count.
Numbers inside names (SARS-CoV-2, COVID-19, report-2024.pdf) and list enumerators ("1. Calibrate") are not
values. No library does this for free text without a model (quantulum3 and similar parse units but bring
their own corpora and classifiers), and the rules fit in a page.
"""

import re
from dataclasses import dataclass

from core.prompt import CITATION_MARKER

_UNITS = {
    # time
    "second": "second", "seconds": "second", "sec": "second", "secs": "second", "s": "second",
    "minute": "minute", "minutes": "minute", "min": "minute", "mins": "minute",
    "hour": "hour", "hours": "hour", "hr": "hour", "hrs": "hour", "h": "hour",
    "day": "day", "days": "day", "week": "week", "weeks": "week", "month": "month", "months": "month",
    "year": "year", "years": "year", "yr": "year", "yrs": "year", "decade": "decade", "decades": "decade",
    # share
    "%": "%", "percent": "%", "pct": "%",  # "per cent" is joined in _tokens
    # money
    "eur": "eur", "euro": "eur", "euros": "eur", "€": "eur", "usd": "usd", "dollar": "usd", "dollars": "usd",
    "$": "usd", "gbp": "gbp", "pound": "gbp", "pounds": "gbp", "£": "gbp",
    # measures
    "mm": "mm", "cm": "cm", "m": "m", "km": "km", "metre": "m", "metres": "m", "meter": "m", "meters": "m",
    "mg": "mg", "g": "g", "kg": "kg", "ml": "ml", "l": "l", "litre": "l", "litres": "l", "liter": "l",
    "liters": "l", "mg/l": "mg/l", "v": "v", "volt": "v", "volts": "v", "w": "w", "watt": "w", "watts": "w",
    "wh": "wh", "kwh": "kwh", "mah": "mah", "hz": "hz", "khz": "khz", "mhz": "mhz", "ghz": "ghz",
    "kb": "kb", "mb": "mb", "gb": "gb", "tb": "tb", "°c": "°c", "°f": "°f", "bar": "bar", "psi": "psi",
    "db": "db", "ppm": "ppm", "nm": "nm", "μm": "μm", "µm": "μm",
    # counts and scales that say what is counted
    "cycle": "cycle", "cycles": "cycle", "time": "time", "times": "time", "fold": "fold",
    "patient": "patient", "patients": "patient", "case": "case", "cases": "case", "death": "death",
    "deaths": "death", "hundred": "hundred", "thousand": "thousand", "million": "million", "billion": "billion",
}
_WORDS = {
    "zero": 0, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50,
    "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90,
}
_PASSAGE_ONLY = {"one": 1}  # a sentence's "one of" is rarely a value; a passage's "one year" is one
_TENS = {"twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"}
_UNIT_NAMES = frozenset(_UNITS.values())
_TENS_VALUES = frozenset(str(_WORDS[word]) for word in _TENS)
_UNITS_BEFORE = {"eur", "usd", "gbp"}  # "EUR 120", "$ 5"
_LOOKAHEAD = 3  # words after a passage's number in which its unit may stand ("five full years")

_FILE_NAME = re.compile(r"\S+\.(?:txt|md|pdf|docx?|html?|csv|json)\b|(?<!\S)/\S+", re.IGNORECASE)
# A number joined to letters by a hyphen is part of a name: SARS-CoV-2, COVID -19, 2019-nCoV, HAdV-55.
_NAME_BEFORE = re.compile(r"[A-Za-z]\s?-$")
_NAME_AFTER = re.compile(r"-([A-Za-z]+)")
_ENUMERATOR = re.compile(r"^\s*(?:[-*\u2022]\s*)?\d+[.)]\s+")
_TOKEN = re.compile(
    r"(?P<number>(?<![A-Za-z0-9.,])\d+(?:,\d{3})+(?:\.\d+)?(?![\d,])|(?<![A-Za-z0-9.,])\d+(?:[.,]\d+)?)"
    r"|(?P<symbol>[%€$£])|(?P<word>[A-Za-zµμ°][A-Za-z/µμ°]*)|(?P<stop>[.;:!?()\[\]\n])"
)


@dataclass(frozen=True)
class Value:
    number: str  # normalised: 2,000 -> 2000, 3.50 -> 3.5
    unit: str | None  # a known unit, normalised ("years" -> "year", "percent" -> "%"); None: none follows


@dataclass(frozen=True)
class Mention:
    """One number of a passage and the words that follow (and the word before) it."""

    number: str
    after: tuple[str, ...]  # normalised units or other words, up to _LOOKAHEAD; empty: nothing follows
    before: str


def sentence_values(sentence: str) -> frozenset[Value]:
    """The values an answer sentence states."""
    text = _ENUMERATOR.sub("", _cleaned(sentence))
    return frozenset(Value(m.number, m.after[0] if m.after and m.after[0] in _UNIT_NAMES
                           else m.before if m.before in _UNITS_BEFORE else None)
                     for m in _mentions(text, passage=False))


def passage_mentions(text: str) -> dict[str, list[Mention]]:
    """Each number a passage states, with its mentions."""
    found: dict[str, list[Mention]] = {}
    for mention in _mentions(_cleaned(text), passage=True):
        found.setdefault(mention.number, []).append(mention)
    return found


def states_values(values: frozenset[Value], mentions: dict[str, list[Mention]]) -> bool:
    """Whether the passage (its ``mentions``) states every value of a sentence."""
    return all(_stated(value, mentions.get(value.number, ())) for value in values)


def _stated(value: Value, mentions) -> bool:
    if not mentions:
        return False
    if value.unit is None:
        return True
    for mention in mentions:
        if value.unit in mention.after or value.unit == mention.before:
            return True
        if not mention.after:
            return True  # nothing follows the number: a table cell, the end of a sentence
    return False



def _cleaned(text: str) -> str:
    return _FILE_NAME.sub(" ", CITATION_MARKER.sub(" ", text))


def _mentions(text: str, *, passage: bool) -> list[Mention]:
    tokens = _tokens(text, passage=passage)
    mentions = []
    for index, (kind, token) in enumerate(tokens):
        if kind != "number":
            continue
        after = []
        for follower_kind, follower in tokens[index + 1 : index + 1 + _LOOKAHEAD]:
            if follower_kind in ("stop", "number"):
                break
            after.append(follower)
        before = tokens[index - 1][1] if index and tokens[index - 1][0] == "unit" else ""
        mentions.append(Mention(token, tuple(after), before))
    return mentions


def _tokens(text: str, *, passage: bool) -> list[tuple[str, str]]:
    """("number" | "unit" | "word" | "stop", normalised text) for each token; number words become numbers."""
    tokens: list[tuple[str, str]] = []
    for match in _TOKEN.finditer(text):
        if match.group("number"):
            if not passage and _in_name(text, match.start(), match.end()):
                continue  # names are checked as names (support.entities_of); a passage's still count as mentions
            tokens.append(("number", _normalised(match.group("number"))))
        elif match.group("symbol"):
            tokens.append(("unit", _UNITS[match.group("symbol")]))
        elif match.group("stop"):
            tokens.append(("stop", match.group("stop")))
        else:
            word = match.group("word").lower()
            number = _WORDS.get(word, _PASSAGE_ONLY.get(word) if passage else None)
            if number is not None:
                # "twenty-five", "twenty five": one number
                if tokens and tokens[-1][0] == "number" and tokens[-1][1] in _TENS_VALUES and number < 10:
                    tokens[-1] = ("number", str(int(tokens[-1][1]) + number))
                    continue
                tokens.append(("number", str(number)))
            elif word == "cent" and tokens and tokens[-1] == ("word", "per"):
                tokens[-1] = ("unit", "%")
            elif word in _UNITS:
                tokens.append(("unit", _UNITS[word]))
            else:
                tokens.append(("word", word))
    return tokens



def _in_name(text: str, start: int, end: int) -> bool:
    after = _NAME_AFTER.match(text, end)
    return bool(_NAME_BEFORE.search(text, max(0, start - 3), start)
                or after and after.group(1).lower() not in _UNITS and after.group(1).lower() not in _WORDS)


def _normalised(raw: str) -> str:
    if re.fullmatch(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?", raw):
        raw = raw.replace(",", "")
    raw = raw.replace(",", ".")
    if "." in raw:
        return raw.rstrip("0").rstrip(".") or "0"
    return raw.lstrip("0") or "0"
