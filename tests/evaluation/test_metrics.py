"""Ranking, answer and citation metrics against values computed by hand, with their edge cases."""

import math

import pytest

from retrieval.ranking_metrics import hit_at_k, mean_scores, ndcg_at_k, ranking_scores, recall_at_k, reciprocal_rank
from evaluation.answer_metrics import (
    answer_scores,
    contains_gold,
    exact_match,
    is_abstention,
    rouge_l,
    token_f1,
)
from evaluation.backends import PassageRef
from evaluation.citation_metrics import citation_scores, load_nli
from evaluation.datasets import EvalQuestion, GoldSource

# ---- ranking -------------------------------------------------------------------------------------

FLAGS = [False, True, False, True]  # relevant at ranks 2 and 4, three relevant items exist


def test_ranking_metrics_by_hand():
    assert hit_at_k(FLAGS, 1) == 0.0 and hit_at_k(FLAGS, 2) == 1.0
    assert recall_at_k(FLAGS, 1, relevant=3) == 0.0
    assert recall_at_k(FLAGS, 5, relevant=3) == pytest.approx(2 / 3)
    assert reciprocal_rank(FLAGS) == 0.5
    assert reciprocal_rank(FLAGS, 1) == 0.0
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    ideal = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(FLAGS, 10, relevant=3) == pytest.approx(dcg / ideal)  # 0.4982
    assert ndcg_at_k(FLAGS, 10, relevant=3) == pytest.approx(0.49819, abs=1e-5)


def test_k_larger_than_the_results_and_empty_rankings():
    assert hit_at_k([True], 10) == 1.0
    assert recall_at_k([True], 10, relevant=1) == 1.0
    assert ndcg_at_k([True], 10, relevant=1) == 1.0
    assert ndcg_at_k([False, True], 10, relevant=1) == pytest.approx(1 / math.log2(3))
    assert (hit_at_k([], 5), recall_at_k([], 5, relevant=2), reciprocal_rank([]), ndcg_at_k([], 10, relevant=2)) == (0, 0, 0, 0)
    assert recall_at_k([True], 5, relevant=0) == 0.0 and ndcg_at_k([True], 5, relevant=0) == 0.0
    with pytest.raises(ValueError, match="k must be at least 1"):
        hit_at_k(FLAGS, 0)


def test_ranking_scores_and_their_mean():
    first = ranking_scores([True], relevant=1)
    second = ranking_scores([False, False], relevant=1)
    assert set(first) == {"hit@1", "hit@5", "hit@10", "recall@1", "recall@5", "recall@10", "MRR", "nDCG@10"}
    mean = mean_scores([first, second])
    assert mean["hit@1"] == 0.5 and mean["MRR"] == 0.5 and mean["nDCG@10"] == 0.5
    assert mean_scores([]) == {}


# ---- answers -------------------------------------------------------------------------------------

def test_exact_match_normalises_case_punctuation_articles_and_markers():
    assert exact_match("The Paris!", "paris") == 1.0
    assert exact_match("Paris [1]", "Paris") == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0


def test_token_f1_by_hand():
    assert token_f1("three years warranty", "three years") == pytest.approx(0.8)  # P 2/3, R 1
    assert token_f1("years three", "three years") == 1.0  # a bag of tokens: order does not matter
    assert token_f1("", "three years") == 0.0
    assert token_f1("", "") == 1.0
    assert token_f1("nothing shared", "three years") == 0.0


def test_rouge_l_by_hand():
    assert rouge_l("x y z w", "x z q") == pytest.approx(4 / 7)  # LCS 2: P 1/2, R 2/3
    assert rouge_l("y x", "x y") == pytest.approx(0.5)  # unlike F1, order matters
    assert rouge_l("", "x") == 0.0 and rouge_l("", "") == 1.0
    assert rouge_l("x [1] y", "x y") == 1.0


def test_contains_gold_is_word_aligned():
    assert contains_gold("It reaches about 8 km [3].", "about 8 km") == 1.0
    assert contains_gold("It reaches 80 km.", "8 km") == 0.0
    assert contains_gold("anything", "") == 0.0


def test_answer_scores_take_the_best_gold_and_need_one():
    scores = answer_scores("Seven days.", ["seven", "7 days"])
    assert scores == {"exact_match": 0.0, "f1": pytest.approx(2 / 3), "rouge_l": pytest.approx(2 / 3), "contains_gold": 1.0}
    with pytest.raises(ValueError):
        answer_scores("x", [])


def test_abstention_phrases_from_the_system_prompts():
    assert is_abstention("The documents do not contain the answer.")
    assert is_abstention("I don\u2019t know.")
    assert is_abstention("I found nothing in the documents for this question, and no generative model is loaded.")
    assert is_abstention("")
    assert not is_abstention("The warranty lasts three years [1].")


# ---- citations -----------------------------------------------------------------------------------

PDF_P2 = PassageRef("c1", "/data/specs/kestrel-tide-datasheet.pdf", 2, 0, 80, "Dissolved oxygen: range 0 to 20 mg/L,\naccuracy 0.1 mg/L.", 1)
MD_P1 = PassageRef("c2", "/data/handbook/maintenance.md", 1, 0, 60, "The optical dissolved-oxygen sensor calibrates itself.", 2)
QUESTION = EvalQuestion("do", "What is the accuracy of the DO sensor?", answers=("0.1 mg/L",),
                        sources=(GoldSource("kestrel-tide-datasheet.pdf", 2),), evidence=("accuracy 0.1 mg/L",))


def test_citation_scores_by_hand():
    scores = citation_scores("Accuracy is 0.1 mg/L [1][2].", [PDF_P2, MD_P1], QUESTION)
    assert scores == {"citation_precision": 0.5, "citation_recall": 1.0, "page_accuracy": 0.5, "no_citation": 0.0}


def test_no_citations_and_unanswerable_questions():
    assert citation_scores("0.1 mg/L", [], QUESTION) == {
        "citation_precision": None, "citation_recall": 0.0, "page_accuracy": None, "no_citation": 1.0}
    wrong_only = citation_scores("x [2]", [MD_P1], QUESTION)
    assert wrong_only["citation_precision"] == 0.0 and wrong_only["citation_recall"] == 0.0
    assert wrong_only["page_accuracy"] == 0.0
    unanswerable = EvalQuestion("ceo", "Who is the CEO?", unanswerable=True)
    assert citation_scores("Someone [1].", [MD_P1], unanswerable) == {
        "citation_precision": None, "citation_recall": None, "page_accuracy": None, "no_citation": 0.0}
    no_pages = EvalQuestion("q", "?", answers=("0.1 mg/L",), sources=(GoldSource("kestrel-tide-datasheet.pdf"),))
    assert citation_scores("x [1]", [PDF_P2], no_pages)["page_accuracy"] is None


class _AlwaysEntails:
    """Stands in for an NLI cross-encoder (a downloaded model): only the hook is under test."""

    def entails(self, premise: str, hypothesis: str) -> bool:
        return "calibrates" in premise


def test_nli_judge_adds_support_beyond_containment_and_unavailable_model_is_skipped():
    scores = citation_scores("It calibrates itself [2].", [MD_P1], QUESTION, nli=_AlwaysEntails())
    assert scores["citation_precision"] == 1.0
    assert load_nli(None) is None
    assert load_nli("no-such-org/no-such-nli-model") is None  # offline: logged and skipped


# ---- conflicting values, question types, errors -------------------------------------------------

@pytest.mark.parametrize(("answer", "conflicting"), [
    ("The warranty is three years [1]; the battery is covered for five years [1].", True),  # two values, one slot
    ("The quick ratio went from 0.67 times in FY2022 to 0.69 times in FY2023.", True),
    ("The warranty is three years [1].", False),
    ("Returns within 30 days; claims are handled within 15 working days.", False),  # other kinds of value
    ("It lasts a year or so.", False),
])
def test_an_answer_hedging_between_values_is_flagged(answer, conflicting):
    from evaluation.answer_metrics import conflicting_values

    golds = ["0.69 times"] if "ratio" in answer else ["three years", "30 days"]
    assert conflicting_values(answer, golds) is conflicting


def test_a_conflicting_answer_is_not_credited_with_the_gold_value():
    from evaluation.backends import Reply
    from evaluation.runner import score_reply

    question = EvalQuestion("w", "How long is the warranty?", answers=("three years",))
    hedged = score_reply(Reply("It is three years, or five years for the battery."), question, retrieval=False)
    plain = score_reply(Reply("It is three years."), question, retrieval=False)
    assert hedged["conflicting"] == 1.0 and hedged["contains_gold"] == 0.0
    assert plain["conflicting"] == 0.0 and plain["contains_gold"] == 1.0


def test_timeouts_and_errors_are_counted_apart():
    from evaluation.backends import Reply
    from evaluation.runner import score_reply, summarise

    question = EvalQuestion("w", "How long is the warranty?", answers=("three years",))
    rows = [score_reply(Reply("", error="504: past server.request_timeout_s", error_kind="timeout"), question,
                        retrieval=True),
            score_reply(Reply("", error="500: boom", error_kind="error"), question, retrieval=True),
            score_reply(Reply("three years [1]"), question, retrieval=True)]
    summary = summarise(rows)
    assert summary["timeout"] == pytest.approx(1 / 3) and summary["error"] == pytest.approx(1 / 3)
    assert summary["contains_gold"] == 1.0  # failed requests are not scored as wrong answers, they are counted


def test_question_types_come_from_the_set_or_from_the_answer(tmp_path):
    from evaluation.datasets import load_question_set

    path = tmp_path / "q.jsonl"
    path.write_text("\n".join([
        '{"question": "How long?", "answer": "three years", "type": "held-out"}',
        '{"question": "How much?", "answer": "310 EUR"}',
        '{"question": "Who?", "answer": "the customer"}',
        '{"question": "When was it founded?", "unanswerable": true}',
    ]))
    kinds = [q.type for q in load_question_set(path).questions]
    assert kinds == ["held-out", "numeric", "text", "unanswerable"]
