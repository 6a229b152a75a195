"""Question-set loaders (lorag JSONL, SQuAD, BEIR) with bad records, and which passages count as relevant."""

import json

import pytest

from core.errors import LoragError
from tests.conftest import SAMPLE_DATA
from evaluation.backends import PassageRef
from evaluation.datasets import EvalQuestion, GoldSource, detect_format, load_question_set


def _passage(source, page=1, start=0, end=100, text=""):
    return PassageRef("id", source, page, start, end, text)


def test_shipped_question_sets_load_cleanly():
    questions = load_question_set(SAMPLE_DATA / "eval" / "questions.jsonl")
    assert questions.format == "lorag" and not questions.bad
    assert 2 <= len(questions.questions) - len(questions.answerable) <= 3
    assert all(q.sources and q.answers for q in questions.answerable)
    general = load_question_set(SAMPLE_DATA / "eval" / "general.jsonl")
    assert not general.bad and all(q.answers and not q.sources for q in general.questions)


def test_lorag_bad_records_are_reported_as_file_line_reason(tmp_path):
    path = tmp_path / "q.jsonl"
    lines = [
        {"question": "How long is the warranty?", "answer": "three years", "sources": [{"doc": "w.txt", "page": 1}]},
        "{not json",
        {"answer": "no question"},
        {"question": "No answer and not marked unanswerable"},
        {"question": "Bad page?", "answer": "x", "sources": [{"doc": "a.pdf", "page": 0}]},
        {"question": "Who is the CEO?", "unanswerable": True},
        {"question": "Bad flag", "answer": "x", "unanswerable": "yes"},
    ]
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    loaded = load_question_set(path)
    assert [q.line for q in loaded.questions] == [1, 6]
    assert loaded.questions[1].unanswerable and loaded.questions[0].sources == (GoldSource("w.txt", 1),)
    reasons = [str(b) for b in loaded.bad]
    assert reasons[0].startswith(f"{path}:2: not valid JSON")
    assert reasons[1] == f"{path}:3: field 'question' must be non-empty text"
    assert reasons[2].startswith(f"{path}:4: field 'answer' is missing")
    assert reasons[3] == f"{path}:5: sources[0].page must be a page number from 1, got 0"
    assert reasons[4] == f"{path}:7: field 'unanswerable' must be true or false, got 'yes'"
    with pytest.raises(LoragError, match=r"q.jsonl:2: not valid JSON"):
        load_question_set(path, strict=True)


def test_unusable_sets_are_refused(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"answer": "x"}\n')
    with pytest.raises(LoragError, match=r"no valid question \(first problem: .*bad.jsonl:1"):
        load_question_set(tmp_path / "bad.jsonl")
    with pytest.raises(LoragError, match="does not exist"):
        load_question_set(tmp_path / "missing.jsonl")
    with pytest.raises(LoragError, match="unknown question set format 'csv'"):
        load_question_set(tmp_path / "bad.jsonl", format="csv")
    (tmp_path / "broken.json").write_text('{"data": 5}')
    with pytest.raises(LoragError, match="is not SQuAD JSON: .data. is int"):
        load_question_set(tmp_path / "broken.json", format="squad")


def _squad(tmp_path):
    context = "The virus spreads by droplets. Masks reduce the spread by half."
    data = {"data": [
        {"paragraphs": [{"document_id": 7, "context": context, "qas": [
            {"id": "a", "question": "How does it spread?", "answers": [{"text": "by droplets", "answer_start": 18}]},
            {"id": "b", "question": "What do masks do?", "answers": [{"text": "reduce the spread", "answer_start": 0}]},
            {"id": "c", "question": "Missing?", "answers": [{"text": "not in the text", "answer_start": 3}]},
        ]}]},
        {"paragraphs": [{"document_id": 8, "context": "Other article.", "qas": [
            {"id": "d", "question": "Impossible?", "answers": [], "is_impossible": True}]}]},
    ]}
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(data))
    return path, context


def test_squad_spans_shifted_offsets_and_bad_answers(tmp_path):
    path, context = _squad(tmp_path)
    assert detect_format(path) == "squad"
    loaded = load_question_set(path)
    assert [q.id for q in loaded.questions] == ["a", "b", "d"]
    assert loaded.documents == {"7": context, "8": "Other article."}
    a, b, d = loaded.questions
    assert a.sources == (GoldSource("7", None, 18, 29),)
    start = context.index("reduce the spread")  # the given offset 0 was wrong: found by text
    assert b.sources[0].start == start and d.unanswerable
    assert [str(x) for x in loaded.bad] == [f"{path}:0: data[0].paragraphs[0].qas[2]: answer 'not in the text' is not in the context"]
    # Relevance: same document (ingested as 7.txt) and an overlapping span, or the answer text inside.
    assert a.is_relevant(_passage("/d/eval-corpora/squad.json/7.txt", start=10, end=25))
    assert not a.is_relevant(_passage("/d/eval-corpora/squad.json/7.txt", start=30, end=60, text="Masks"))
    assert a.is_relevant(_passage("/d/7.txt", start=500, end=600, text="spread BY droplets"))
    assert not a.is_relevant(_passage("/d/8.txt", start=10, end=25))


def test_corpus_docs_and_limit_sample_reproducibly(tmp_path):
    path, _ = _squad(tmp_path)
    one_doc = load_question_set(path, corpus_docs=1, seed=3)
    assert len(one_doc.documents) == 1
    assert all(s.doc in one_doc.documents for q in one_doc.questions for s in q.sources)
    first = [q.id for q in load_question_set(path, limit=2, seed=5).questions]
    assert first == [q.id for q in load_question_set(path, limit=2, seed=5).questions] and len(first) == 2


def test_beir_directory(tmp_path):
    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text(
        json.dumps({"_id": "d1", "title": "Tides", "text": "Tides rise twice a day."}) + "\n"
        + json.dumps({"_id": "d2", "text": "Buoys float."}) + "\n" + json.dumps({"text": "no id"}) + "\n")
    (tmp_path / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "How often do tides rise?"}) + "\n")
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t0\nq9\td2\t1\nq1\tbroken\n")
    assert detect_format(tmp_path) == "beir"
    loaded = load_question_set(tmp_path)
    (question,) = loaded.questions
    assert question.sources == (GoldSource("d1"),)
    assert loaded.documents["d1"] == "Tides\n\nTides rise twice a day."
    assert sorted(str(b).split(": ", 1)[1] for b in loaded.bad) == [
        "expected query-id, corpus-id, score", "needs '_id' and 'text'", "query 'q9' is not in queries.jsonl"]
    assert question.is_relevant(_passage("/x/eval-corpora/beir/d1.txt"))
    assert not question.is_relevant(_passage("/x/eval-corpora/beir/d2.txt"))


def test_gold_documents_match_by_path_tail_basename_and_page():
    question = EvalQuestion("q", "?", answers=("8 km",), sources=(GoldSource("kestrel-tide-datasheet.pdf", 3),
                                                                 GoldSource("handbook/getting-started.md")))
    assert question.matched_sources(_passage("/srv/data/specs/kestrel-tide-datasheet.pdf", page=3)) == [0]
    assert question.matched_sources(_passage("/srv/data/specs/kestrel-tide-datasheet.pdf", page=2)) == []
    assert question.matched_sources(_passage("/srv/data/handbook/getting-started.md")) == [1]
    assert question.matched_sources(_passage("/srv/other/getting-started.markdown")) == []
