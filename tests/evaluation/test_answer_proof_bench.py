"""benchmarks/answer_proof.py on a real dataset and benchmarks/answer_proof_sweep.py: the split of COVID-QA into
ingested and left-out articles, the prompt order of saved passages, and what each pair of bars answers."""

import argparse
import json
import sys

from core.prompt import ABSTENTION_ANSWER
from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))

from benchmarks import answer_proof, answer_proof_sweep  # noqa: E402


def _article(doc: int, context: str, qas: list[tuple[int, str, str]]) -> dict:
    return {"paragraphs": [{"document_id": doc, "context": context, "qas": [
        {"id": qid, "question": q, "answers": [{"text": a, "answer_start": context.find(a)}], "is_impossible": False}
        for qid, q, a in qas]}]}


def test_covidqa_asks_unanswerable_questions_only_of_articles_left_out(tmp_path):
    articles = [_article(i, f"Article {i} says the incubation period is {i} days. Shared fact: bats carry it.",
                         [(10 * i, f"What does article {i} say?", f"incubation period is {i} days"),
                          (10 * i + 1, "Who carries it?", "bats carry it")]) for i in range(1, 7)]
    source = tmp_path / "covidQA.json"
    source.write_text(json.dumps({"data": articles}))
    args = argparse.Namespace(covidqa=source, articles=3, answerable=10, unanswerable=10, seed=0)
    questions, docs = answer_proof._covidqa(args, tmp_path / "work")
    rows = [json.loads(line) for line in questions.read_text().splitlines()]
    ingested = {path.name for path in docs.iterdir()}
    assert len(ingested) == 3
    answerable = [r for r in rows if not r.get("unanswerable")]
    unanswerable = [r for r in rows if r.get("unanswerable")]
    assert len(answerable) == 6 and all(r["sources"][0]["doc"] in ingested for r in answerable)
    # 3 articles left out, each with one own question; "bats carry it" is in the ingested text: skipped
    assert len(unanswerable) == 3 and all(r["question"].startswith("What does article") for r in unanswerable)
    asked_of = {int(r["question"].split()[3]) for r in unanswerable}
    assert not {f"covid-{i}.txt" for i in asked_of} & ingested


def test_saved_passages_are_in_prompt_order():
    body = {"citations": [{"number": 3, "sentences": [0], "id": "c"}, {"number": 1, "sentences": [1], "id": "a"}],
            "context": [{"id": "b"}, {"id": "d"}]}
    assert [p["id"] for p in answer_proof._retrieved(body)] == ["a", "b", "c", "d"]
    assert "number" not in answer_proof._retrieved(body)[0]


def _item(**fields) -> answer_proof_sweep.Replayed:
    base = dict(id="q", set="s", half="tune", unanswerable=False, question=None, answerability=0.6,
                draft_text="Draft [1].", draft_cited=[1], draft_stands=True, quote_support=0.5,
                quote_text="Quote [2].", quote_cited=[2], passages=[])
    return answer_proof_sweep.Replayed(**(base | fields))


def test_each_pair_of_bars_decides_as_the_server_does():
    outcome = answer_proof_sweep._outcome
    assert outcome(_item(answerability=0.4), 0.52, 0.3) == (ABSTENTION_ANSWER, [])  # declined before generating
    assert outcome(_item(answerability=0.4), 0.0, 0.3) == ("Draft [1].", [1])  # 0 = never
    assert outcome(_item(), 0.52, 0.3) == ("Draft [1].", [1])  # a supported draft stands, whatever the quote bar
    unsupported = _item(draft_stands=False)
    assert outcome(unsupported, 0.52, 0.5) == ("Quote [2].", [2])
    assert outcome(unsupported, 0.52, 0.51) == (ABSTENTION_ANSWER, [])
    assert outcome(_item(draft_stands=False, quote_text=None), 0.52, 0.0) == (ABSTENTION_ANSWER, [])


def test_hotpotqa_asks_unanswerable_questions_whose_paragraphs_are_not_ingested(tmp_path):
    def record(i: int) -> dict:
        return {"question_id": f"q{i}", "question_text": f"Where was Person{i} born?",
                "answers_objects": [{"spans": [f"Town{i}"]}],
                "contexts": [{"title": f"Person{i}", "paragraph_text": f"Person{i} was born in Town{i}.",
                              "is_supporting": True},
                             {"title": "Shared distractor", "paragraph_text": "A paragraph about nothing.",
                              "is_supporting": False}]}

    source = tmp_path / "dev.jsonl"
    source.write_text("".join(json.dumps(record(i)) + "\n" for i in range(8)))
    args = argparse.Namespace(hotpotqa=source, answerable=3, unanswerable=10, seed=0)
    questions, docs = answer_proof._hotpotqa(args, tmp_path / "work")
    rows = [json.loads(line) for line in questions.read_text().splitlines()]
    ingested = {path.name for path in docs.iterdir()}
    answerable = [r for r in rows if not r.get("unanswerable")]
    unanswerable = [r for r in rows if r.get("unanswerable")]
    assert len(answerable) == 3 and len(unanswerable) == 5  # every other question: its paragraph is not ingested
    assert "Shared-distractor.txt" in ingested and len(ingested) == 4  # a paragraph shared by questions, once
    assert all(r["sources"][0]["doc"] in ingested and r["answers"] for r in answerable)
    corpus = " ".join((docs / name).read_text() for name in ingested)
    for row in unanswerable:
        person = row["question"].split()[-2]
        assert f"{person}.txt" not in ingested and f"Town{person[6:]}" not in corpus
