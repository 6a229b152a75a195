"""How well one passage supports one answer sentence, from the embedder and the words alone (no extra model).

Four features per (sentence, passage) pair, combined by a logistic model fitted on 3,588 labelled COVID-QA
pairs (answer-bearing sentences, templated and paraphrased answers as positives; the most similar wrong
chunks, swapped numbers and names as negatives), measured on held-out articles (benchmarks/RESULTS.md):
- ``cos_best``: the best cosine between the sentence and the passage's sentence windows;
- ``recall_q``: the share of the sentence's content-word stems found in the passage, not counting words that
  only restate the question (restating the question is no claim);
- ``num_ok``: every number of the sentence appears in the passage;
- ``ent_ok``: every acronym or capitalised name of the sentence appears in the passage.
Embedding similarity alone is weak here (AUC 0.83, and near chance against a swapped value): the words and
the exact checks on numbers and names do most of the work. On top of the model, a passage that does not state
each of the sentence's values (a number with its unit: server/attribution/numeric.py) supports it with
probability 0: similarity must not vouch for a value, and ``num_ok`` alone left a marker the model wrote on
such a passage (its probability could still clear ``keep_threshold``).
"""

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from core.prompt import CITATION_MARKER
from retrieval.keyword import TermWeights, stem_words
from server.attribution.numeric import Mention, Value, passage_mentions, sentence_values, states_values

# Answerability's blend, chosen with attribution.abstain_below on the sample set, COVID-QA and HotpotQA drafts
# (benchmarks/RESULTS.md, "Rare words weigh most"): how much the cosine counts against word coverage, and how much
# of word coverage is weighted by rarity (1: all of it; plain coverage remains for a question without an index).
COS_WEIGHT = 0.4
RARE_WEIGHT = 1.0

WEIGHTS = {"bias": -18.048, "cos_best": 1.833, "recall_q": 10.637, "num_ok": 4.820, "ent_ok": 3.721}

_WORD = re.compile(r"[A-Za-z0-9]+(?:[.,][0-9]+)*%?")
_NUMBER = re.compile(r"(?<![A-Za-z0-9.])\d+(?:[.,]\d+)*")
_ENTITY = re.compile(r"\b(?:[A-Z][A-Za-z0-9\-]*[A-Z0-9][A-Za-z0-9\-]*|[A-Z][a-z]{3,})\b")
STOPWORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have having he
    her here hers herself him himself his how i if in into is it its itself just me more most my myself no nor
    not now of off on once only or other our ours out over own same she should so some such than that the their
    theirs them then there these they this those through to too under until up very was we were what when where
    which while who whom why will with would you your yours answer according document documents passage
    passages text states stated say says said based provided given mentioned following""".split()
)
# Words that shape a question rather than name what it asks about ("how MANY days", "how LONG is"): an answer
# sentence rarely repeats them, so they do not count against its support.
QUESTION_WORDS = frozenset(
    "many much long often far old large big kind type sort whom whose did should could would must may might "
    "shall".split()
)
_NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
    "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12", "fifteen": "15", "twenty": "20",
    "thirty": "30", "fifty": "50", "hundred": "100", "half": "50%",
}
# Stems no passage is expected to repeat for a question: its stop words and question-shaping words. Their rarity
# in the index says nothing (a corpus that seldom writes "what" or "often" would make them weigh most).
_NO_CLAIM_STEMS = frozenset(stem_words(sorted(STOPWORDS | QUESTION_WORDS)))


def content_stems(text: str) -> list[str]:
    """Stemmed content words of ``text``, markers and stop words left out, number words as digits."""
    words = [_NUMBER_WORDS.get(w.lower(), w.lower()) for w in _WORD.findall(CITATION_MARKER.sub(" ", text))]
    return stem_words([w for w in words if w not in STOPWORDS and (len(w) > 1 or w.isdigit())])


def numbers_of(text: str, *, number_words: bool = False) -> set[str]:
    """Numbers written in ``text``, normalised (400,000 -> 400000, 3.50 -> 3.5). A sentence's "one of" or "half
    of" are rarely values, so ``number_words`` counts "one" and "half" only for passages."""
    text = CITATION_MARKER.sub(" ", text)
    found = set()
    for raw in _NUMBER.findall(text):
        if re.fullmatch(r"\d{1,3}(?:,\d{3})+", raw):
            raw = raw.replace(",", "")
        raw = raw.replace(",", ".")
        if "." in raw:
            raw = raw.rstrip("0").rstrip(".") or "0"
        found.add(raw)
    for word in re.findall(r"[A-Za-z]+", text.lower()):
        if word in _NUMBER_WORDS and (number_words or word not in ("one", "half")):
            found.add(_NUMBER_WORDS[word].rstrip("%"))
    return found


def entities_of(sentence: str) -> list[str]:
    """Acronyms (ACE2, SARS-CoV-2) and capitalised words of 4+ letters, except the sentence's first word."""
    sentence = CITATION_MARKER.sub(" ", sentence).strip()
    return [m.group() for m in _ENTITY.finditer(sentence) if m.start() > 0 and m.group().lower() not in STOPWORDS]


@dataclass
class PassageEvidence:
    """What a passage offers as evidence: its text, windows with their vectors, stems and numbers."""

    text: str
    windows: list[str]
    window_vectors: np.ndarray  # (len(windows), dimension), L2-normalised
    stems: set[str]
    numbers: set[str]
    lower: str
    mentions: dict[str, list[Mention]]  # the numbers it states, with their units (numeric.py)

    @classmethod
    def of(cls, text: str, windows: list[str], window_vectors: np.ndarray) -> "PassageEvidence":
        return cls(text, windows, window_vectors, set(content_stems(text)), numbers_of(text, number_words=True),
                   text.lower(), passage_mentions(text))


@dataclass(frozen=True)
class Claim:
    """One answer sentence, prepared once and checked against every passage."""

    text: str
    vector: np.ndarray  # (dimension,)
    stems: frozenset[str]
    numbers: frozenset[str]
    entities: tuple[str, ...]
    values: frozenset[Value]  # numbers with their units, each of which a supporting passage must state

    @classmethod
    def of(cls, text: str, vector: np.ndarray) -> "Claim":
        return cls(text, vector, frozenset(content_stems(text)), frozenset(numbers_of(text)), tuple(entities_of(text)),
                   sentence_values(text))


def support_probability(claim: Claim, passage: PassageEvidence, question_stems: frozenset[str]) -> float:
    """The probability (0..1) that ``passage`` supports ``claim``; see the module docstring for the features.
    0 when the passage does not state one of the claim's values."""
    if not states_values(claim.values, passage.mentions):
        return 0.0
    free = (claim.stems & question_stems) - passage.stems  # question words the passage lacks
    counted = claim.stems - free if claim.stems - free else claim.stems
    features = {
        "cos_best": float(np.max(passage.window_vectors @ claim.vector)) if len(passage.windows) else 0.0,
        "recall_q": len(claim.stems & passage.stems) / max(len(counted), 1),
        "num_ok": float(claim.numbers <= passage.numbers),
        "ent_ok": float(all(entity.lower() in passage.lower for entity in claim.entities)),
    }
    z = WEIGHTS["bias"] + sum(WEIGHTS[name] * value for name, value in features.items())
    return 1.0 / (1.0 + math.exp(-z))


def answerability(question: str, question_vector: np.ndarray, passages: Sequence[PassageEvidence], *,
                  rarity: TermWeights | None = None, cos_weight: float = COS_WEIGHT,
                  rare_weight: float = RARE_WEIGHT) -> float:
    """How well the passages' best window matches the question (0 without a window): ``cos_weight`` * cosine +
    the rest * the share of the question the window covers. That share is the plain share of the question's
    content stems, blended (``rare_weight``) with the share of its keyword terms weighted by their rarity in the
    tenant's index (``rarity``), so that a question whose rare words no passage holds scores low however
    on-topic it reads.

    A question that compares named subjects ("Who died first, Bryce Courtenay or Juan Carlos Onetti?") is
    answered from one window per subject, usually in different documents, so the best pair of windows may
    cover it together (their words pooled, the better cosine); no single window can. Only such questions pool:
    pooling any question's best two windows also lifts the on-topic questions no passage answers (measured in
    benchmarks/RESULTS.md, "Questions that compare")."""
    stems = frozenset(content_stems(question))
    rarity = rarity.without(_NO_CLAIM_STEMS) if rarity is not None else None
    rarity = rarity if rarity is not None and rarity.weights else None  # no term left to weigh: plain overlap
    matches = [match for passage in passages for match in _window_matches(question_vector, stems, passage, rarity)]
    if not matches:
        return 0.0

    def coverage(held_stems: frozenset[str], held_terms: frozenset[str]) -> float:
        overlap = len(held_stems) / len(stems) if stems else 0.0
        if rarity is not None:
            overlap = (1 - rare_weight) * overlap + rare_weight * rarity.share(held_terms)
        return overlap

    best = max(0.0, *(cos_weight * cosine + (1 - cos_weight) * coverage(s, t) for cosine, s, t in matches))
    if not compares_subjects(question):
        return best
    # Windows holding the same words pair alike: keep the best cosine of each. Then every two, most covering
    # first: a union covers at most what its two parts cover together, so once even the best cosine with that
    # sum cannot beat the best score, no later pair can (exact, and few pairs are tried even with k = 50).
    distinct: dict[tuple[frozenset[str], frozenset[str]], float] = {}
    for cosine, held_stems, held_terms in matches:
        distinct[(held_stems, held_terms)] = max(cosine, distinct.get((held_stems, held_terms), -1.0))
    ranked = sorted(((coverage(*key), cosine, key) for key, cosine in distinct.items()), key=lambda item: -item[0])
    top_cosine = max(distinct.values())

    def bound(covered: float) -> float:
        return cos_weight * top_cosine + (1 - cos_weight) * covered

    for index, (covered_a, cosine_a, (stems_a, terms_a)) in enumerate(ranked):
        if bound(2 * covered_a) <= best:
            break
        for covered_b, cosine_b, (stems_b, terms_b) in ranked[index + 1:]:
            if bound(covered_a + covered_b) <= best:
                break
            pooled = coverage(stems_a | stems_b, terms_a | terms_b)
            best = max(best, cos_weight * max(cosine_a, cosine_b) + (1 - cos_weight) * pooled)
    return best


def compares_subjects(question: str) -> bool:
    """Whether ``question`` joins two named subjects with "or"/"and" ("Bryce Courtenay or Juan Carlos Onetti",
    "Are Pothos and Tibouchina both ...", "the Marsilea or the Brabejum"): the words either side of the
    conjunction are capitalised, the question's first word not counted as a name. One pass over the words (a
    question is user input: no backtracking pattern)."""
    words = [word.strip("\"'()\u201c\u201d\u2018\u2019") for word in question.split()]
    for i in range(2, len(words) - 1):
        if words[i] not in ("or", "and"):
            continue
        following = words[i + 2] if words[i + 1] == "the" and i + 2 < len(words) else words[i + 1]
        if _capitalised(words[i - 1].rstrip(",:;")) and _capitalised(following):
            return True
    return False


def _capitalised(word: str) -> bool:
    return word[:1].isupper()


def _window_matches(question_vector: np.ndarray, stems: frozenset[str], passage: PassageEvidence,
                    rarity: TermWeights | None) -> list[tuple[float, frozenset[str], frozenset[str]]]:
    """Per window of ``passage``: (cosine to the question, question stems it holds, weighted terms it holds)."""
    if not passage.windows:
        return []
    cosines = passage.window_vectors @ question_vector
    held = rarity.held(passage.windows) if rarity is not None else [frozenset()] * len(passage.windows)
    return [(float(cosine), stems & frozenset(content_stems(window)), terms)
            for window, cosine, terms in zip(passage.windows, cosines, held)]
