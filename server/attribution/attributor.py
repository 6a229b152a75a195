"""Every answer carries its proof: each sentence matched to the retrieved passages that support it.

After generation, whatever the model wrote: a sentence without a marker gets the passage that supports it, a
marker pointing to a passage that does not support its sentence is moved to one that does or dropped, and
sentences no passage supports are flagged. Before generation, a question no passage can answer is declined.
"""

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from core.prompt import CITATION_MARKER, marker_numbers
from core.records import Passage
from retrieval.keyword import TermWeights
from server.attribution.sentences import split_sentences
from server.settings import AttributionSettings
from server.attribution.support import Claim, PassageEvidence, answerability, content_stems, support_probability

EmbedTexts = Callable[[Sequence[str]], np.ndarray]  # L2-normalised rows, the retrieval embedder's space

# Further supporting passages must reach this share of the best one's support probability.
_RELATIVE = 0.8
# A sentence with fewer content words ("Yes.", "I hope this helps.") carries no claim to check.
_MIN_CLAIM_STEMS = 2
_CLOSING = re.compile(r"[.!?]+[\"'\u201d\u2019)]*$")
# "According to covid-2668.txt: <sentence>" (how quotes name their document): the source is no part of the claim,
# and its words and digits, absent from the passage's text, would count against the sentence.
_SOURCE_LEAD_IN = re.compile(r"^According to [^:,\n]{1,120}[:,]\s+(?=\S)", re.IGNORECASE)


@dataclass(frozen=True)
class SentenceSupport:
    """One sentence of the final answer text: ``start``/``end`` index that text; ``citations`` are the
    1-based passage numbers that support it, best first (the markers it now carries)."""

    start: int
    end: int
    text: str
    supported: bool
    claim: bool  # False: too short to be a checkable claim (neither supported nor unsupported)
    citations: tuple[int, ...]
    score: float  # the best passage's support probability


@dataclass(frozen=True)
class Attribution:
    text: str  # the answer with markers kept, moved, added or dropped
    sentences: tuple[SentenceSupport, ...]

    @property
    def cited(self) -> list[int]:
        """Passage numbers in order of first citation."""
        seen: list[int] = []
        for sentence in self.sentences:
            seen += [n for n in sentence.citations if n not in seen]
        return seen


class Attributor:
    def __init__(self, embed_texts: EmbedTexts, settings: AttributionSettings):
        self.embed_texts = embed_texts
        self.settings = settings

    def evidence(self, passages: Sequence[Passage]) -> dict[str, PassageEvidence]:
        """Each passage's windows, vectors, stems and numbers by chunk id, embedded in one call; a request
        computes them once and uses them before (answerability) and after (attribution) generation."""
        windows = [_windows(passage) for passage in passages]
        vectors = self._embed([w for group in windows for w in group])
        found, position = {}, 0
        for passage, group in zip(passages, windows):
            found[passage.chunk.id] = PassageEvidence.of(passage.chunk.text, group, vectors[position : position + len(group)])
            position += len(group)
        return found

    def attribute(self, answer: str, passages: Sequence[Passage], *, question: str = "",
                  evidence: dict[str, PassageEvidence] | None = None) -> Attribution:
        """Match each sentence of ``answer`` to ``passages`` (numbered [1]..[n] in this order, as in the prompt).
        ``evidence`` (from :meth:`evidence`) saves embedding the passages again."""
        spans = split_sentences(answer)
        claims_text = [_claim_text(_plain(answer[start:end])) for start, end in spans]
        missing = [p for p in passages if evidence is None or p.chunk.id not in evidence]
        known = (evidence or {}) | (self.evidence(missing) if missing else {})
        ordered = [known[passage.chunk.id] for passage in passages]
        vectors = self._embed(claims_text)
        question_stems = frozenset(content_stems(question))
        results = []
        for index, (start, end) in enumerate(spans):
            claim = Claim.of(claims_text[index], vectors[index])
            written = _written_numbers(answer[start:end], len(passages))
            results.append(self._judge(claim, written, ordered, question_stems))
        return _rewrite(answer, spans, results)

    def answerability(self, question: str, passages: Sequence[Passage], *,
                      evidence: dict[str, PassageEvidence] | None = None, rarity: TermWeights | None = None) -> float:
        """How well the best passage window (or pair of windows, for a question comparing subjects) matches
        ``question`` (0..1); below ``abstain_below`` no passage answers it. ``rarity``: the question's terms
        weighted by their rarity in the tenant's index (RetrievalService.term_weights), so the words no passage
        holds count by how rare they are. See support.answerability."""
        if not passages:
            return 0.0
        known = evidence if evidence is not None else self.evidence(passages)
        return answerability(question, self._embed([question])[0], [known[p.chunk.id] for p in passages],
                             rarity=rarity)

    def should_abstain(self, question: str, passages: Sequence[Passage], *,
                       rarity: TermWeights | None = None) -> tuple[bool, float]:
        score = self.answerability(question, passages, rarity=rarity)
        return score < self.settings.abstain_below, score

    def _judge(self, claim: Claim, written: list[int], evidence: list[PassageEvidence],
               question_stems: frozenset[str]) -> tuple[bool, bool, tuple[int, ...], float]:
        """(claim, supported, markers to carry, best p) for one sentence."""
        settings = self.settings
        # A lead-in ("These are the sentences that match your question:") introduces claims; it makes none.
        if len(claim.stems) < _MIN_CLAIM_STEMS or claim.text.endswith(":") or not evidence:
            return False, False, tuple(n for n in written if n <= len(evidence)), 0.0
        scores = [support_probability(claim, passage, question_stems) for passage in evidence]
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        best = scores[order[0]]
        supporting = [i + 1 for i in order if scores[i] >= settings.support_threshold and scores[i] >= _RELATIVE * best]
        kept = [n for n in written if scores[n - 1] >= settings.keep_threshold]
        # The model's own markers stay where a passage backs them; otherwise the best supporting passage replaces them.
        markers = kept or supporting[:1]
        return True, bool(supporting or kept), tuple(markers[: settings.max_citations]), best

    def _embed(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.embed_texts(texts), dtype=np.float32) if texts else np.zeros((0, 0), np.float32)


def _windows(passage: Passage, *, max_words: int = 30) -> list[str]:
    """The passage's sentences packed into windows of about ``max_words`` words (the unit the thresholds were
    measured on). Ingest's own windows are cut by tokens, and may split one fact across two."""
    text = passage.chunk.text
    windows: list[str] = []
    current: list[str] = []
    words = 0
    for start, end in split_sentences(text):
        sentence = " ".join(text[start:end].split())
        count = len(sentence.split())
        if current and words + count > max_words:
            windows.append(" ".join(current))
            current, words = [], 0
        current.append(sentence)
        words += count
    if current:
        windows.append(" ".join(current))
    return windows or [text]


def _plain(sentence: str) -> str:
    """The sentence without markers, spaces before punctuation closed up."""
    return re.sub(r"\s+([.!?,;:])", r"\1", " ".join(CITATION_MARKER.sub(" ", sentence).split()))


def _claim_text(sentence: str) -> str:
    """What a sentence claims: without a leading "According to <source>:"."""
    return _SOURCE_LEAD_IN.sub("", sentence, count=1)


def _written_numbers(sentence: str, passage_count: int) -> list[int]:
    numbers: list[int] = []
    for match in CITATION_MARKER.finditer(sentence):
        numbers += [n for n in marker_numbers(match.group(), passage_count) if n not in numbers]
    return numbers


def _rewrite(answer: str, spans: list[tuple[int, int]], judged: list) -> Attribution:
    """The answer with each sentence's markers replaced by its final ones, placed before its closing punctuation."""
    pieces: list[str] = []
    sentences: list[SentenceSupport] = []
    position = length = 0
    for (start, end), (claim, supported, markers, best) in zip(spans, judged):
        between = answer[position:start]
        body = re.sub(r"\s+([.!?,;:])", r"\1", CITATION_MARKER.sub("", answer[start:end])).rstrip()
        text = _plain(body)
        if markers:
            marker = "[" + ", ".join(str(n) for n in markers) + "]"
            closing = _CLOSING.search(body)
            body = (body[: closing.start()].rstrip() + " " + marker + body[closing.start():]) if closing \
                else f"{body} {marker}"
        length += len(between)
        sentences.append(SentenceSupport(length, length + len(body), text, supported, claim, markers, best))
        pieces += [between, body]
        length += len(body)
        position = end
    pieces.append(answer[position:])
    return Attribution("".join(pieces), tuple(sentences))
