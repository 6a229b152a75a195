"""The fallback when no generative model is loaded: quotes the retrieved sentences that best match the question.

It says plainly that it is not a model, every sentence it quotes carries the [n] of its passage (so citations
work exactly as they do for generated answers), and when no sentence supports the question it says that the
documents do not contain the answer instead of quoting near misses.
"""

import asyncio
import math
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from typing import Literal

from core.records import Passage
from retrieval.keyword import stem_words
from server.attribution.support import QUESTION_WORDS
from server.generation.protocol import GenerationRequest, GenerationStream, PromptInfo, TextDelta

NOTHING_FOUND = (
    "I found nothing in the documents for this question, and no generative model is loaded to answer "
    "without them."
)
HEADER = "No generative model is loaded, so these are the sentences from your documents that best match the question:"
NO_MATCH = (
    "No generative model is loaded, and no sentence of the retrieved documents shares a word with the question, "
    "so I cannot find the answer in them. The best-ranked passage begins:"
)
# The wording of core.prompt.SYSTEM_PROMPT's rule 3, which evaluation.answer_metrics counts as declining.
NOT_SUPPORTED = (
    "The documents do not contain the answer to this question: no sentence of the passages retrieved for it "
    "matches it closely enough to quote, and no generative model is loaded to answer without them."
)
# Below its min_support the answer is NOT_SUPPORTED (see ExtractiveGenerator.support), measured by
# benchmarks/extractive_abstention.py (benchmarks/RESULTS.md, "Extractive fallback"). Without an embedder, how the
# server builds this generator, support is word coverage and 0.64 the lowest value declining 80% of unanswerable
# questions. With one it is cosine similarity, and 0.35 declines only clear misses: a cosine high enough for 80%
# also declines the paraphrases that ranking by meaning is there to find.
DEFAULT_MIN_SUPPORT = 0.64
DEFAULT_MIN_SIMILARITY = 0.35

# A sentence ends at . ! ? before whitespace and a capital/digit/quote, or at a blank line or list item.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])|\n\s*\n|\n(?=\s*(?:[-*\u2022]|\d+[.)])\s)")
_WORD = re.compile(r"\w+")
_STOPWORDS = frozenset(
    "a an and are as at be by can do does for from has have how i in is it its of on or that the this to was "
    "were what when where which who why will with you your".split()
)
_QUESTION_PARTS = re.compile(r"[,;]\s*(?:and\s+)?|\s+and\s+")  # where a question may ask a second thing

# Page furniture: lines that are part of no sentence (each pattern matches a whole line, spaces collapsed).
_PAGE_NUMBER = re.compile(
    r"(?:(?i:page|p\.)\s*)?\d{1,4}(?:\s*(?i:of|/)\s*\d{1,4})?"  # "12", "Page 3", "3 of 8", "3/8"
    r"|[-\u2013\u2014]\s*\d{1,4}\s*[-\u2013\u2014]"  # "- 12 -"
    r"|[ivxlc]{1,7}"  # "iv" (front matter)
)
_PAGE_MARKER = re.compile(r"(?i)\bpage\s+\d{1,4}\s+of\s+\d{1,4}\b")  # "Kestrel Instruments | Page 3 of 8"
_CONTENTS = re.compile(r"(?i)(?:table\s+of\s+)?contents")
_LEADER_ENTRY = re.compile(r".*\S\s*(?:(?:\.\s?){4,}|\u2026+|(?:\u00b7\s?){3,}|_{4,})\s*\d{1,4}")  # "Returns ..... 12"
_PAGED_ENTRY = re.compile(r".*\D\s\d{1,4}")  # a line ending in a page number, inside a table of contents
_LONGEST_FURNITURE = 100  # characters: a longer line is text, even when it repeats

# The token count when no tokenizer is given (approximate_tokens): a word is one token per 6 characters begun,
# and a punctuation mark is one token.
_TOKEN_PIECE = re.compile(r"\w{1,6}|[^\w\s]")


def approximate_tokens(text: str) -> int:
    """How many tokens ``text`` is, without a tokenizer: words in pieces of up to 6 characters, plus punctuation.

    It errs a little high, which keeps an answer within a model's ``max_tokens``: 9% more than the embedding
    model's WordPiece tokenizer (all-MiniLM-L6-v2) on data/docs, 3% more on COVID-QA articles. A model's own
    tokenizer, when there is one, is passed to :class:`ExtractiveGenerator` as ``count_tokens``.
    """
    return len(_TOKEN_PIECE.findall(text))


class ExtractiveGenerator:
    """A :class:`server.generation.protocol.Generator` that quotes passages instead of generating text."""

    name = "extractive"
    kind: Literal["extractive"] = "extractive"

    def __init__(
        self,
        *,
        embedder=None,
        max_sentences: int = 3,
        relative_floor: float = 0.5,
        min_support: float | None = None,
        count_tokens: Callable[[str], int] | None = None,
    ):
        self.embedder = embedder  # retrieval.embedder.Embedder; scores by meaning instead of shared words
        self.max_sentences = max_sentences
        self.relative_floor = relative_floor  # a quoted sentence scores at least this share of the best
        # Below it the answer says the documents do not contain the answer.
        default = DEFAULT_MIN_SUPPORT if embedder is None else DEFAULT_MIN_SIMILARITY
        self.min_support = default if min_support is None else min_support
        # e.g. lambda text: len(tokenizer.encode(text, add_special_tokens=False)); else approximate_tokens
        self.count_tokens = count_tokens or approximate_tokens

    async def start(self, request: GenerationRequest) -> GenerationStream:
        question = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
        passages = tuple(request.passages)

        def answer() -> tuple[int, list[TextDelta]]:
            pieces = self.answer_pieces(question, passages)
            # What it reads is its prompt: the question and the passages' text.
            read = self.count_tokens(question) + sum(self.count_tokens(p.chunk.text) for p in passages)
            limit = request.sampling.max_tokens
            return read, _within_budget(pieces, self.count_tokens, sys.maxsize if limit is None else limit)

        prompt_tokens, deltas = await asyncio.to_thread(answer)
        info = PromptInfo(prompt_tokens=prompt_tokens, passages_used=passages, dropped_passages=0)
        return GenerationStream(prompt=info, deltas=_stream(deltas))

    async def close(self) -> None:
        return None

    def answer_pieces(self, question: str, passages: Sequence[Passage]) -> list[str]:
        """The answer as the pieces it is streamed in: a header, then one cited sentence per piece.

        When the quoted sentences come from more than one document, each names its document, so values that
        differ between documents are never merged into one unattributed answer.
        """
        if not passages:
            return [NOTHING_FOUND]
        by_passage = _passage_sentences(passages)
        candidates = _sentences(by_passage)
        if not candidates:
            return [NOTHING_FOUND]
        scores = self._scores(question, [sentence for sentence, _ in candidates])
        chosen = self._chosen(candidates, scores)
        if not chosen:
            # The best-ranked passage's first statement: a question it asks would read as the answer's start.
            statements = [(sentence, number) for sentence, number in candidates if not sentence.endswith("?")]
            if not statements:
                return [NOTHING_FOUND]
            first_sentence, number = statements[0]
            return [NO_MATCH, f"\n\n{first_sentence} [{number}]"]
        if self._support(question, passages, by_passage, scores) < self.min_support:
            return [NOT_SUPPORTED]
        return [HEADER, *self._quotes(passages, candidates, chosen)]

    def quote(self, question: str, passages: Sequence[Passage]) -> list[str] | None:
        """The passages' sentences that best answer ``question``, each with its [n], as pieces; None when no
        sentence supports the question well enough to quote (the same bar as :meth:`answer_pieces`).

        The chat service answers with these when nothing a model wrote stands on a passage
        (``attribution.unsupported = "quote"``).
        """
        by_passage = _passage_sentences(passages)
        candidates = _sentences(by_passage)
        if not candidates:
            return None
        scores = self._scores(question, [sentence for sentence, _ in candidates])
        chosen = self._chosen(candidates, scores)
        if not chosen or self._support(question, passages, by_passage, scores) < self.min_support:
            return None
        return self._quotes(passages, candidates, chosen)

    def _chosen(self, candidates: list[tuple[str, int]], scores: list[float]) -> list[int]:
        # A question the passage asks ("What was the major finding of the study?") states nothing: never quoted,
        # and it sets no bar for the statements that may answer it.
        statements = [i for i, (sentence, _) in enumerate(candidates) if not sentence.endswith("?")]
        ranked = sorted(statements, key=lambda i: (-scores[i], candidates[i][1]))
        # Quote only sentences that match nearly as well as the best one: padding the answer with
        # weak matches (a title sharing one word with the question) reads as if they were relevant.
        floor = max((scores[i] for i in statements), default=0.0) * self.relative_floor
        return [i for i in ranked if scores[i] > 0 and scores[i] >= floor][: self.max_sentences]

    def _quotes(self, passages: Sequence[Passage], candidates: list[tuple[str, int]], chosen: list[int]) -> list[str]:
        # the stored name when there is one (relative to what was ingested), else the path: only its tail is shown
        chunks = [passages[candidates[i][1] - 1].chunk for i in chosen]
        sources = [chunk.name or chunk.source for chunk in chunks]
        names = _document_names(sources) if len(set(sources)) > 1 else {}
        quotes = []
        for i, source in zip(chosen, sources):
            sentence, number = candidates[i]
            attribution = f"According to {names[source]}: " if names else ""
            quotes.append(f"\n\n{attribution}{sentence} [{number}]")
        return quotes

    def support(self, question: str, passages: Sequence[Passage]) -> float:
        """How well the best sentence of ``passages`` supports the question; quoting needs ``support >= min_support``.

        With an embedder: the best sentence's cosine similarity to the question. Without one, from 0 to 1: the
        share of the question's terms (stemmed; stopwords and words such as "many" or "long" left out) that the
        sentence, the sentence just before or after it in its passage, or that passage's headings contain (a
        heading is never quoted, but it says what the sentences under it are about), each term weighted by its
        inverse frequency among the passages' sentences: a rare term such as a name counts more than one every
        sentence shares, and a term no sentence has counts most. A question in parts ("X, and Y") is also
        supported when each part is, by different sentences. 0 when there is no sentence or no term.
        """
        by_passage = _passage_sentences(passages)
        candidates = _sentences(by_passage)
        if not candidates:
            return 0.0
        scores = self._scores(question, [sentence for sentence, _ in candidates]) if self.embedder is not None else []
        return self._support(question, passages, by_passage, scores)

    def _support(self, question: str, passages: Sequence[Passage], by_passage: list[list[str]],
                 scores: list[float]) -> float:
        # A question the passage asks counts here, though it is never quoted: in an FAQ it heads its answer as a
        # heading does ("Is there an API? ... 600 requests per minute"). Leaving it out lost that sample answer
        # (benchmarks/answer_proof.py --generator extractive: correct 72% -> 70%).
        if self.embedder is not None:
            return max(scores)  # the best sentence's cosine similarity
        return _word_support(question, by_passage, _headings(passages))

    def _scores(self, question: str, sentences: list[str]) -> list[float]:
        if self.embedder is not None:
            vectors = self.embedder.embed_documents(sentences)  # (n, d), L2-normalised
            return [float(score) for score in vectors @ self.embedder.embed_query(question)]
        # Stemmed, as _word_support measures the best sentence: ranked on plain words, "What do the findings
        # indicate?" found no sentence saying "finding" or "indicates" to quote although its support was 1.
        terms = [stem_words(_terms(text)) for text in (question, *sentences)]
        return _bm25(terms[0], terms[1:])


def _passage_sentences(passages: Sequence[Passage]) -> list[list[str]]:
    """Each passage's sentences in reading order, without page furniture and Markdown headings.

    Furniture is page numbers, "Page 3 of 8", table-of-contents entries, and lines that recur on two or more
    pages of one document among the passages (running headers and footers).
    """
    running = _running_lines(passages)
    result = []
    for passage in passages:
        text = _without_furniture(passage.chunk.text, running.get(passage.chunk.source, set()))
        sentences = (" ".join(piece.split()) for piece in _SENTENCE_END.split(text))
        # A Markdown heading names a topic and states nothing: quoting it answers no question.
        result.append([sentence for sentence in sentences if len(sentence) >= 12 and not sentence.startswith("#")])
    return result


def _sentences(by_passage: list[list[str]]) -> list[tuple[str, int]]:
    """(sentence, passage number) in passage order; a sentence repeated by overlapping chunks is kept once."""
    seen: set[str] = set()
    result = []
    for number, sentences in enumerate(by_passage, start=1):
        for sentence in sentences:
            if sentence not in seen:
                seen.add(sentence)
                result.append((sentence, number))
    return result


def _running_lines(passages: Sequence[Passage]) -> dict[str, set[str]]:
    """Per document, the short lines found on two or more of its pages: its running headers and footers."""
    pages: dict[tuple[str, str], set[int]] = defaultdict(set)
    for passage in passages:
        for line in passage.chunk.text.splitlines():
            line = " ".join(line.split())
            if line and len(line) <= _LONGEST_FURNITURE:
                pages[(passage.chunk.source, line)].add(passage.chunk.page)
    running: dict[str, set[str]] = defaultdict(set)
    for (source, line), seen_on in pages.items():
        if len(seen_on) > 1:
            running[source].add(line)
    return running


def _without_furniture(text: str, running: set[str]) -> str:
    """``text`` with its furniture lines blanked, so the text around one never joins into one sentence."""
    lines = []
    in_contents = False  # after a "Contents" line, entries ending in a page number are furniture too
    for raw in text.splitlines():
        line = " ".join(raw.split())
        if not line:
            lines.append("")
            continue
        if _CONTENTS.fullmatch(line):
            in_contents = True
            lines.append("")
            continue
        in_contents = in_contents and bool(_PAGED_ENTRY.fullmatch(line))
        furniture = (
            in_contents
            or line in running
            or _PAGE_NUMBER.fullmatch(line) is not None
            or _LEADER_ENTRY.fullmatch(line) is not None
            or (len(line) <= _LONGEST_FURNITURE and _PAGE_MARKER.search(line) is not None and line[-1] not in ".!?")
        )
        lines.append("" if furniture else raw)
    return "\n".join(lines)


def _document_names(sources: Sequence[str]) -> dict[str, str]:
    """Each source's file name, with as many parent folders as tell it apart from the others; never the full path."""
    parts = {source: [p for p in source.replace("\\", "/").split("/") if p] or [source] for source in set(sources)}
    names = {}
    for source, path in parts.items():
        depth = 1
        while depth < len(path) and any(
            other != source and other_path[-depth:] == path[-depth:] for other, other_path in parts.items()
        ):
            depth += 1
        names[source] = "/".join(path[-depth:])
    return names


def _terms(text: str) -> list[str]:
    return [word for word in _WORD.findall(text.lower()) if word not in _STOPWORDS]


def _headings(passages: Sequence[Passage]) -> list[str]:
    """Each passage's heading path and the Markdown headings in its text."""
    headings = []
    for passage in passages:
        lines = [line for line in passage.chunk.text.splitlines() if line.lstrip().startswith("#")]
        headings.append(" ".join([*passage.chunk.heading_path, *lines]))
    return headings


def _word_support(question: str, by_passage: list[list[str]], headings: list[str]) -> float:
    """The best inverse-frequency-weighted share of the question's terms that a sentence, its neighbours in its
    passage and that passage's headings contain; for a question in parts, the least supported part's share
    when that is more (see ExtractiveGenerator.support)."""
    def stems(text: str, *, leave_out: frozenset[str] = frozenset()) -> set[str]:
        return set(stem_words([word for word in _terms(text) if word not in leave_out]))

    parts = [stems(part, leave_out=QUESTION_WORDS) for part in _QUESTION_PARTS.split(question)]
    asked = set().union(*parts)
    found = {sentence: stems(sentence) & asked for sentences in by_passage for sentence in sentences}
    if not asked or not found:
        return 0.0
    frequency = Counter(term for terms in found.values() for term in terms)
    weight = {term: math.log(1 + (len(found) - frequency[term] + 0.5) / (frequency[term] + 0.5)) for term in asked}
    windows = []
    for sentences, heading in zip(by_passage, headings):
        titled = stems(heading) & asked
        # An answer often names its subject in the sentence before ("Rinse the probe ... Calibrate every 90 days");
        # each passage is read whole here, so a sentence an overlapping chunk repeats keeps its neighbours.
        windows += [titled.union(*(found[s] for s in sentences[max(0, i - 1) : i + 2])) for i in range(len(sentences))]

    def share(terms: set[str]) -> float:  # of ``terms``, covered by the best window
        return max(sum(weight[t] for t in window & terms) for window in windows) / sum(weight[t] for t in terms)

    # A question that asks two things ("refunds for returns, and revenue growth") is supported when each part
    # is, by different sentences; a part needs two terms, so "sensitivity and specificity of X" stays whole.
    parts = [part for part in parts if len(part) >= 2]
    return max(share(asked), min(map(share, parts)) if len(parts) > 1 else 0.0)


def _bm25(query: list[str], documents: list[list[str]], *, k1: float = 1.2, b: float = 0.75) -> list[float]:
    """Okapi BM25 of each sentence for the question's terms, with the sentences themselves as the corpus."""
    count = len(documents)
    average_length = sum(len(d) for d in documents) / count or 1.0
    frequency = Counter(term for document in documents for term in set(document))
    scores = []
    for document in documents:
        counts = Counter(document)
        score = 0.0
        for term in set(query):
            if counts[term]:
                idf = math.log(1 + (count - frequency[term] + 0.5) / (frequency[term] + 0.5))
                saturation = counts[term] * (k1 + 1) / (counts[term] + k1 * (1 - b + b * len(document) / average_length))
                score += idf * saturation
        scores.append(score)
    return scores


def _within_budget(pieces: list[str], count_tokens: Callable[[str], int], max_tokens: int) -> list[TextDelta]:
    """The pieces that fit in ``max_tokens``, each with its token count; cut at a piece (sentence) boundary.

    Quoted sentences are whole pieces, so a cut never separates a sentence from its [n]. Only when not even
    the first piece fits is it cut between words. The last delta says "length" when anything was left out.
    """
    deltas, used = [], 0
    for piece in pieces:
        tokens = count_tokens(piece)
        if used + tokens > max_tokens:
            if not deltas:
                piece = _first_words(piece, count_tokens, max_tokens)
                deltas.append(TextDelta(text=piece, tokens=count_tokens(piece)))
            break
        deltas.append(TextDelta(text=piece, tokens=tokens))
        used += tokens
    else:
        return _finish(deltas, "stop")
    return _finish(deltas, "length")


def _first_words(text: str, count_tokens: Callable[[str], int], max_tokens: int) -> str:
    words = text.split(" ")
    low, high = 0, len(words)  # the longest prefix of words within the budget, by bisection
    while low < high:
        middle = (low + high + 1) // 2
        if count_tokens(" ".join(words[:middle])) <= max_tokens:
            low = middle
        else:
            high = middle - 1
    return " ".join(words[:low])


def _finish(deltas: list[TextDelta], reason: Literal["stop", "length"]) -> list[TextDelta]:
    last = deltas[-1] if deltas else TextDelta(text="")
    return [*deltas[:-1], TextDelta(text=last.text, tokens=last.tokens, finish_reason=reason)]


async def _stream(deltas: list[TextDelta]):
    for delta in deltas:
        yield delta
