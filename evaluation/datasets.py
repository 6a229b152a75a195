"""Question sets for ``lorag eval``: lorag JSONL, SQuAD JSON (e.g. COVID-QA) and BEIR directories.

Each loader yields :class:`EvalQuestion` records with what makes a passage relevant (document, page,
answer span); bad records are reported as ``file:line: reason`` and skipped. SQuAD and BEIR sets also
carry their corpus, so it can be ingested before retrieval is measured.
"""

import csv
import json
import logging
import posixpath
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import LoragError
from training.data import BadRecord, read_json_records

log = logging.getLogger(__name__)

FORMATS = ("lorag", "squad", "beir")
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class GoldSource:
    """Where the answer is: a document (path or basename), optionally a 1-based page and a character span."""

    doc: str
    page: int | None = None
    start: int | None = None  # answer span in the document's (page's) text; SQuAD only
    end: int | None = None


@dataclass(frozen=True)
class EvalQuestion:
    id: str
    question: str
    answers: tuple[str, ...] = ()  # gold answer first, then accepted alternatives
    sources: tuple[GoldSource, ...] = ()
    evidence: tuple[str, ...] = ()  # text a supporting passage contains (besides the answers)
    unanswerable: bool = False
    line: int = 0
    kind: str = ""  # the set's own question type ("type"/"question_type"), e.g. "held-out" or "comparison"

    @property
    def type(self) -> str:
        """What results are grouped by: the set's own type, else unanswerable / numeric / text."""
        if self.kind:
            return self.kind
        if self.unanswerable:
            return "unanswerable"
        return "numeric" if any(ch.isdigit() for ch in self.answer) else "text"

    @property
    def answer(self) -> str:
        return self.answers[0] if self.answers else ""

    def is_relevant(self, passage) -> bool:
        """Whether a retrieved passage (anything with source, page, start, end, text) supports this question."""
        return bool(self.matched_sources(passage))

    def matched_sources(self, passage) -> list[int]:
        """Indexes of the gold sources ``passage`` covers.

        The source must match a gold document (full path or basename, with or without extension) and the
        page when the gold names one; a gold span must overlap the passage, or the passage must contain
        the answer text (chunks may be cut at other offsets than the set's own).
        """
        matched = []
        for index, gold in enumerate(self.sources):
            if not same_document(passage.source, gold.doc):
                continue
            if gold.page is not None and passage.page != gold.page:
                continue
            if (
                gold.start is None
                or (passage.start < gold.end and gold.start < passage.end)
                or any(normalise_text(a) and normalise_text(a) in normalise_text(passage.text) for a in self.answers)
            ):
                matched.append(index)
        return matched


@dataclass
class QuestionSet:
    name: str
    format: str
    questions: list[EvalQuestion]
    bad: list[BadRecord] = field(default_factory=list)
    documents: dict[str, str] = field(default_factory=dict)  # doc name -> text, for sets that bring a corpus

    @property
    def answerable(self) -> list[EvalQuestion]:
        return [q for q in self.questions if not q.unanswerable]


def same_document(source: str, doc: str) -> bool:
    """``source`` (as ingested, often an absolute path) names the gold ``doc``: equal, same tail, or same stem."""
    source, doc = source.replace("\\", "/"), doc.replace("\\", "/")
    if source == doc or source.endswith("/" + doc.lstrip("/")):
        return True
    base, gold_base = posixpath.basename(source), posixpath.basename(doc)
    return base == gold_base or posixpath.splitext(base)[0] == gold_base


def normalise_text(text: str) -> str:
    """Lower-case with runs of whitespace made one space: for containment checks across line breaks."""
    return _SPACE.sub(" ", text).strip().lower()


def detect_format(path: Path) -> str:
    """``beir`` for a directory, ``squad`` for JSON with a top-level ``data`` list, else ``lorag``."""
    if path.is_dir():
        return "beir"
    if path.suffix == ".json":
        try:
            with open(path, encoding="utf-8") as file:
                head = file.read(4096).lstrip()
        except OSError as error:
            raise LoragError(f"question set {str(path)!r} cannot be read: {error.strerror or error}") from error
        if head.startswith("{") and '"data"' in head:
            return "squad"
    return "lorag"


def load_question_set(
    path: str | Path, *, format: str | None = None, limit: int = 0, corpus_docs: int = 0, seed: int = 0,
    strict: bool = False,
) -> QuestionSet:
    """Read a question set; ``format`` None detects it from the path.

    ``corpus_docs`` keeps that many seeded-random documents of a set that brings its corpus (and only their
    questions); ``limit`` then keeps a seeded sample of that many questions (0 = all).

    Raises:
        LoragError: missing file, unknown format, no valid question, or (``strict``) the first bad record.
    """
    path = Path(path)
    if not path.exists():
        raise LoragError(f"question set {str(path)!r} does not exist")
    format = format or detect_format(path)
    loaders = {"lorag": _load_lorag, "squad": _load_squad, "beir": _load_beir}
    if format not in loaders:
        raise LoragError(f"unknown question set format {format!r}", hint=f"Use one of {', '.join(FORMATS)}")
    questions, bad, documents = loaders[format](path)
    if strict and bad:
        raise LoragError(f"bad question record {bad[0]}", hint="Fix the record or run without --strict to skip it")
    for problem in bad:
        log.warning("skipping bad question record %s", problem)
    rng = random.Random(seed)
    if corpus_docs and documents and corpus_docs < len(documents):
        kept = set(rng.sample(sorted(documents), corpus_docs))
        documents = {name: text for name, text in documents.items() if name in kept}
        questions = [q for q in questions if any(s.doc in kept for s in q.sources)]
    if limit and limit < len(questions):
        chosen = sorted(rng.sample(range(len(questions)), limit))
        questions = [questions[i] for i in chosen]
    if not questions:
        raise LoragError(f"question set {str(path)!r} has no valid question" + (f" (first problem: {bad[0]})" if bad else ""))
    return QuestionSet(path.name, format, questions, bad, documents)


# ---- lorag JSONL: {question, answer, sources: [{doc, page}], unanswerable?, evidence?, answers?, id?} ------

def _load_lorag(path: Path):
    questions, bad = [], []
    for line, record, error in _jsonl(path):
        try:
            if error is not None:
                raise ValueError(error)
            questions.append(_parse_lorag(record, line))
        except ValueError as invalid:
            bad.append(BadRecord(str(path), line, str(invalid)))
    return questions, bad, {}


def _parse_lorag(record: object, line: int) -> EvalQuestion:
    if not isinstance(record, dict):
        raise ValueError(f"expected an object with 'question', got {type(record).__name__}")
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("field 'question' must be non-empty text")
    unanswerable = record.get("unanswerable", False)
    if not isinstance(unanswerable, bool):
        raise ValueError(f"field 'unanswerable' must be true or false, got {unanswerable!r}")
    answers = []
    if record.get("answer") is not None:
        answers.append(record["answer"])
    answers += record.get("answers") or []
    if not all(isinstance(a, str) and a.strip() for a in answers):
        raise ValueError("fields 'answer'/'answers' must be non-empty text")
    if not answers and not unanswerable:
        raise ValueError("field 'answer' is missing (set \"unanswerable\": true for a question without one)")
    sources = record.get("sources") or []
    if not isinstance(sources, list):
        raise ValueError("field 'sources' must be a list of {doc, page}")
    gold = []
    for index, source in enumerate(sources):
        if isinstance(source, str):
            source = {"doc": source}
        if not isinstance(source, dict) or not isinstance(source.get("doc"), str) or not source["doc"].strip():
            raise ValueError(f"sources[{index}] needs 'doc': a document path or file name")
        page = source.get("page")
        if page is not None and (not isinstance(page, int) or isinstance(page, bool) or page < 1):
            raise ValueError(f"sources[{index}].page must be a page number from 1, got {page!r}")
        gold.append(GoldSource(source["doc"], page))
    evidence = record.get("evidence") or []
    if isinstance(evidence, str):
        evidence = [evidence]
    if not isinstance(evidence, list) or not all(isinstance(e, str) and e.strip() for e in evidence):
        raise ValueError("field 'evidence' must be text or a list of texts")
    kind = record.get("type", record.get("question_type", ""))
    if not isinstance(kind, str):
        raise ValueError(f"field 'type' must be text, got {kind!r}")
    return EvalQuestion(
        id=str(record.get("id", f"q{line}")), question=question, answers=tuple(answers), sources=tuple(gold),
        evidence=tuple(evidence), unanswerable=unanswerable, line=line, kind=kind.strip(),
    )


def _jsonl(path: Path) -> Iterator[tuple[int, object, str | None]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise LoragError(f"question set {str(path)!r} cannot be read as UTF-8 text: {error}") from error
    yield from read_json_records(text, str(path))


# ---- SQuAD JSON: data[].paragraphs[].{context, qas[].{id, question, answers[].{text, answer_start}}} ---------

def _load_squad(path: Path):
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))["data"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise LoragError(f"question set {str(path)!r} is not SQuAD JSON (an object with a 'data' list): {error}") from error
    if not isinstance(data, list):
        raise LoragError(f"question set {str(path)!r} is not SQuAD JSON: 'data' is {type(data).__name__}, not a list")
    questions, bad, documents = [], [], {}
    # SQuAD is one JSON document: "line" is the article and paragraph ("data[3].paragraphs[0].qas[5]").
    for a, article in enumerate(data):
        for p, paragraph in enumerate(article.get("paragraphs", []) if isinstance(article, dict) else []):
            where = f"data[{a}].paragraphs[{p}]"
            context = paragraph.get("context") if isinstance(paragraph, dict) else None
            if not isinstance(context, str) or not context.strip():
                bad.append(BadRecord(str(path), 0, f"{where}: no 'context' text"))
                continue
            doc = _doc_name(paragraph.get("document_id", article.get("title", f"doc{a}-{p}")))
            documents[doc] = documents.get(doc, "") + ("\n\n" if doc in documents else "") + context
            offset = len(documents[doc]) - len(context)
            for q, qa in enumerate(paragraph.get("qas", [])):
                try:
                    questions.append(_parse_squad_qa(qa, doc, context, offset))
                except ValueError as invalid:
                    bad.append(BadRecord(str(path), 0, f"{where}.qas[{q}]: {invalid}"))
    return questions, bad, documents


def _parse_squad_qa(qa: object, doc: str, context: str, offset: int) -> EvalQuestion:
    if not isinstance(qa, dict) or not isinstance(qa.get("question"), str) or not qa["question"].strip():
        raise ValueError("no 'question' text")
    if qa.get("is_impossible"):
        return EvalQuestion(str(qa.get("id", "")), qa["question"], unanswerable=True)
    answers = [a for a in qa.get("answers") or [] if isinstance(a, dict) and isinstance(a.get("text"), str) and a["text"].strip()]
    if not answers:
        raise ValueError("no answer text")
    first = answers[0]
    start = first.get("answer_start", -1)
    if not isinstance(start, int) or context[start : start + len(first["text"])] != first["text"]:
        start = context.find(first["text"])  # some sets have shifted offsets: find the text instead
    if start < 0:
        raise ValueError(f"answer {first['text'][:40]!r} is not in the context")
    span = GoldSource(doc, None, offset + start, offset + start + len(first["text"]))
    return EvalQuestion(
        str(qa.get("id", "")), qa["question"], answers=tuple(dict.fromkeys(a["text"].strip() for a in answers)),
        sources=(span,), evidence=(first["text"].strip(),),
    )


def _doc_name(value: object) -> str:
    # Ingested as "<name>.txt": safe file names, and basename matching finds them again.
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(value)).strip("._") or "doc"


# ---- BEIR directory: corpus.jsonl, queries.jsonl, qrels/<split>.tsv ---------------------------------------

def _load_beir(path: Path, split: str = "test"):
    corpus_file, queries_file = path / "corpus.jsonl", path / "queries.jsonl"
    qrels_file = path / "qrels" / f"{split}.tsv"
    for needed in (corpus_file, queries_file, qrels_file):
        if not needed.is_file():
            raise LoragError(f"BEIR directory {str(path)!r} has no {needed.relative_to(path)}",
                             hint="A BEIR set has corpus.jsonl, queries.jsonl and qrels/test.tsv")
    bad, documents, texts = [], {}, {}
    for line, record, error in _jsonl(corpus_file):
        if error is None and _beir_record(record):
            title = record.get("title") or ""
            documents[_doc_name(record["_id"])] = f"{title}\n\n{record['text']}" if title else record["text"]
        else:
            bad.append(BadRecord(str(corpus_file), line, error or "needs '_id' and 'text'"))
    for line, record, error in _jsonl(queries_file):
        if error is None and _beir_record(record):
            texts[str(record["_id"])] = (record["text"], line)
        else:
            bad.append(BadRecord(str(queries_file), line, error or "needs '_id' and 'text'"))
    relevant: dict[str, list[str]] = {}
    with open(qrels_file, encoding="utf-8") as file:
        for line, row in enumerate(csv.reader(file, delimiter="\t"), start=1):
            if line == 1 and row and not row[-1].strip().lstrip("-").isdigit():
                continue  # header: query-id corpus-id score
            if len(row) < 3 or not row[2].strip().lstrip("-").isdigit():
                bad.append(BadRecord(str(qrels_file), line, "expected query-id, corpus-id, score"))
                continue
            if int(row[2]) > 0:  # graded relevance counts as relevant (binary gains)
                relevant.setdefault(row[0], []).append(_doc_name(row[1]))
    questions = []
    for query_id, docs in relevant.items():
        if query_id not in texts:
            bad.append(BadRecord(str(qrels_file), 0, f"query {query_id!r} is not in queries.jsonl"))
            continue
        text, line = texts[query_id]
        questions.append(EvalQuestion(query_id, text, sources=tuple(GoldSource(d) for d in docs), line=line))
    return questions, bad, documents


def _beir_record(record: object) -> bool:
    return isinstance(record, dict) and isinstance(record.get("_id"), str | int) and isinstance(record.get("text"), str)
