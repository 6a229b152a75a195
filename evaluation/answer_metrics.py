"""Answer quality against gold answers: exact match, token F1, ROUGE-L, contains-gold, and abstention.

Normalisation follows the SQuAD evaluation script (lower-case, no punctuation, no articles, single
spaces); ``[n]`` citation markers are removed first so cited and uncited answers compare alike.
"""

import re
import string
from collections import Counter
from collections.abc import Sequence

from core.prompt import CITATION_MARKER

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)

# What an answer says when it declines: the system prompts ask for "the documents do not contain the
# answer" (core.prompt.SYSTEM_PROMPT) or to "say so plainly" when the model does not know
# (SYSTEM_PROMPT_NO_DOCUMENTS); the extractive generator says it "found nothing in the documents"; the server
# declines with core.prompt.ABSTENTION_ANSWER ("The documents do not say ...").
ABSTENTION_PHRASES = (
    "do not contain", "does not contain", "don't contain", "doesn't contain", "did not contain",
    "not contain the answer", "not mentioned in the documents", "not in the documents",
    "no information", "not provided in the documents", "found nothing in the documents",
    "i do not know", "i don't know", "i am not sure", "i'm not sure", "cannot answer", "can't answer",
    "unable to answer", "cannot find", "could not find", "couldn't find", "no answer",
    "documents do not say", "documents don't say", "do not mention", "does not mention",
)


def normalise_answer(text: str) -> str:
    """SQuAD normalisation after removing citation markers."""
    text = CITATION_MARKER.sub(" ", text).lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalise_answer(prediction) == normalise_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """Harmonic mean of token precision and recall (SQuAD); both empty counts as a match."""
    predicted, expected = normalise_answer(prediction).split(), normalise_answer(gold).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, gold: str) -> float:
    """ROUGE-L F1 (beta 1) over normalised tokens: LCS length against both lengths.

    A plain dynamic-programming LCS rather than the rouge-score package: that package is not a
    dependency, and on single answers its stemming and tokenising rules add nothing the SQuAD
    normalisation does not already give.
    """
    predicted, expected = normalise_answer(prediction).split(), normalise_answer(gold).split()
    if not predicted or not expected:
        return float(predicted == expected)
    lcs = _lcs_length(predicted, expected)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(predicted), lcs / len(expected)
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)  # one row of the (len(a)+1, len(b)+1) table at a time
    for token in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def contains_gold(prediction: str, gold: str) -> float:
    """1.0 when the normalised gold answer occurs in the normalised prediction (word-aligned)."""
    expected = normalise_answer(gold)
    if not expected:
        return 0.0
    return float(f" {expected} " in f" {normalise_answer(prediction)} ")


# A value with what it counts: "3 years", "0.1 mg/L", "310 EUR", "15 %"; a bare four-digit year is its own kind.
_VALUE = re.compile(r"(?<![\w.])(\d+(?:[.,]\d+)*)\s*(%|[A-Za-z\u00b5/]+)?")
_NUMBER_WORDS = {"one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
                 "eight": "8", "nine": "9", "ten": "10", "twelve": "12", "fifteen": "15", "twenty": "20",
                 "thirty": "30", "forty": "40", "fifty": "50", "hundred": "100"}
_UNIT_ALIASES = {"year": "years", "yr": "years", "yrs": "years", "day": "days", "week": "weeks", "month": "months",
                 "hour": "hours", "minute": "minutes", "percent": "%", "eur": "eur", "euro": "eur", "euros": "eur"}


def stated_values(text: str) -> set[tuple[str, str]]:
    """The (number, unit) pairs ``text`` states: "three-year" -> ("3", "years"), "2,000 cycles" -> ("2000", "cycles")."""
    text = CITATION_MARKER.sub(" ", text).lower().replace("-", " ")
    text = re.sub(r"\b(" + "|".join(_NUMBER_WORDS) + r")\b", lambda m: _NUMBER_WORDS[m.group(1)], text)
    values = set()
    for number, unit in _VALUE.findall(text):
        number = number.replace(",", "") if re.fullmatch(r"\d{1,3}(?:,\d{3})+", number) else number.replace(",", ".")
        if "." in number:
            number = number.rstrip("0").rstrip(".") or "0"
        unit = _UNIT_ALIASES.get(unit or "", unit or "")
        if not unit and re.fullmatch(r"(19|20)\d\d", number):
            unit = "year"  # a calendar year
        values.add((number, unit))
    return values


def conflicting_values(prediction: str, golds: Sequence[str]) -> bool:
    """Whether ``prediction`` states a gold value and, beside it, another value of the same kind (both years'
    figures, both plans' prices): it hedges between answers, and containing the gold one must not be credited."""
    stated = stated_values(prediction)
    for gold in golds:
        expected = stated_values(gold)
        hits = stated & expected
        if hits and any(unit == hit_unit and number != hit_number
                        for number, unit in stated - expected for hit_number, hit_unit in hits):
            return True
    return False


def is_abstention(prediction: str) -> bool:
    """The answer declines (see :data:`ABSTENTION_PHRASES`); an empty answer counts as declining."""
    text = " ".join(CITATION_MARKER.sub(" ", prediction).lower().replace("\u2019", "'").split())
    return not text or any(phrase in text for phrase in ABSTENTION_PHRASES)


def answer_scores(prediction: str, golds: Sequence[str]) -> dict[str, float]:
    """EM, F1, ROUGE-L and contains-gold of one answer: the best over the accepted gold answers."""
    if not golds:
        raise ValueError("answer_scores needs at least one gold answer")
    return {
        "exact_match": max(exact_match(prediction, g) for g in golds),
        "f1": max(token_f1(prediction, g) for g in golds),
        "rouge_l": max(rouge_l(prediction, g) for g in golds),
        "contains_gold": max(contains_gold(prediction, g) for g in golds),
    }
