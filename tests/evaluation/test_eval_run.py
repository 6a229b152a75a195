"""`lorag eval` end to end on the sample corpus: in-process with the tiny Llama and an adapter (all four
modes, general set, perplexity), with the extractive generator (citations, blind report), and over HTTP."""

import json

import pytest

from lorag.cli import main
from tests.conftest import SAMPLE_DATA
from tests.evaluation.conftest import ADAPTER

QUESTIONS = SAMPLE_DATA / "eval" / "questions.jsonl"
FOUR = ["base", "rag", "adapter", "rag+adapter"]


def _config(tmp_path):
    path = tmp_path / "lorag.toml"
    # A model that fails to load must fail the test, not fall back to extractive; no adapter polling thread.
    path.write_text('[generation]\nfallback = "error"\n\n[adapters]\npoll_interval_s = 0\n')
    return str(path)


def _outputs(out):
    results = json.loads((out / "results.json").read_text())
    return results, (out / "report.md").read_text(), (out / "report.html").read_text()


def test_four_modes_with_the_tiny_model_general_set_and_perplexity(eval_corpus, tiny_llama_path, tmp_path, capsys):
    out = tmp_path / "report"
    code = main([
        "eval", "--data-dir", str(eval_corpus.data_dir), "--config", _config(tmp_path), "--tenant", "acme",
        "--questions", str(QUESTIONS), "--model", str(tiny_llama_path), "--adapter", ADAPTER, "--max-tokens", "8",
        "--general", str(SAMPLE_DATA / "eval" / "general.jsonl"), "--heldout", str(SAMPLE_DATA / "train" / "sample.jsonl"),
        # A random model's text is supported by no passage: with attribution on, every rag answer would be declined
        # alike, and this test is about the harness showing each mode's own answer.
        "--attribution", "off", "--out", str(out), "--no-progress",
    ])
    assert code == 0
    results, markdown, html = _outputs(out)
    assert results["format_version"] == 1 and results["generator"].startswith("transformers")
    assert set(results["retrieval"]["summary"]) == {"dense", "keyword", "hybrid"}
    assert results["retrieval"]["summary"]["dense"]["hit@10"] > 0  # real retrieval over the real corpus
    summary = results["answers"]["summary"]
    assert list(summary) == FOUR
    assert all(summary[mode]["error"] == 0.0 and summary[mode]["answers"] == 13 for mode in FOUR)
    assert summary["base"]["citation_precision"] is None  # no passages, nothing to cite
    entry = results["answers"]["per_question"][0]
    assert set(entry["answers"]) == set(FOUR)
    # The random-weight adapter really runs: its answers differ from the base model's somewhere.
    texts = {mode: [q["answers"][mode]["text"] for q in results["answers"]["per_question"]] for mode in FOUR}
    assert texts["adapter"] != texts["base"] and texts["rag+adapter"] != texts["rag"]
    general = results["general"]
    assert set(general["summary"]) == {"base", "adapter"} and set(general["drop"]) == {"exact_match", "f1", "rouge_l", "contains_gold"}
    ppl = results["perplexity"]
    assert ppl["examples"] == 42 and ppl["tokens"] > 0 and ppl["base"] > 1 and ppl["adapter"] > 1 and ppl["base"] != ppl["adapter"]
    for mode in FOUR:
        assert f"| {mode} |" in markdown and f"<td>{mode}</td>" in html
    assert "General ability" in markdown and "Perplexity" in html
    plots = {p.name for p in (out / "plots").iterdir()}
    assert plots == {"retrieval.png", "answers.png", "citations.png", "general.png", "perplexity.png"}
    assert all((out / "plots" / p).read_bytes().startswith(b"\x89PNG") for p in plots)
    assert "Answers" in capsys.readouterr().out


def test_extractive_answers_give_citation_metrics_and_a_blind_report(eval_corpus, tmp_path):
    out = tmp_path / "blind"
    assert main([
        "eval", "--data-dir", str(eval_corpus.data_dir), "--config", _config(tmp_path), "--tenant", "acme",
        "--questions", str(QUESTIONS), "--generator", "extractive", "--adapter", ADAPTER, "--blind",
        "--retrieval-modes", "hybrid", "--out", str(out), "--no-progress",
    ]) == 0
    results, markdown, html = _outputs(out)
    rag = results["answers"]["summary"]["rag"]
    assert rag["citation_recall"] > 0.5 and rag["citation_precision"] > 0 and rag["page_accuracy"] > 0
    assert rag["no_citation"] < 0.5 and rag["contains_gold"] > 0.5
    assert results["answers"]["summary"]["base"]["abstention_accuracy"] == 1.0  # "found nothing in the documents"
    key = json.loads((out / "blind_key.json").read_text())
    assert set(key) == {q["id"] for q in results["answers"]["per_question"]}
    assert all(sorted(labels.values()) == sorted(FOUR) for labels in key.values())
    side_by_side = markdown.split("## Answers side by side", 1)[1]
    assert "Answer A" in side_by_side and "| rag |" not in side_by_side and "rag+adapter" not in side_by_side
    assert "Answer D" in html


def test_retrieval_only_on_a_squad_set_ingests_its_corpus(eval_corpus, tmp_path, capsys):
    context = "Kestrel buoys report every ten minutes. The hull is yellow and floats well in salt water."
    squad = {"data": [{"paragraphs": [{"document_id": "buoy", "context": context, "qas": [
        {"id": "1", "question": "What colour is the hull?", "answers": [{"text": "yellow", "answer_start": 52}]}]}]}]}
    path = tmp_path / "tiny-squad.json"
    path.write_text(json.dumps(squad))
    out = tmp_path / "retrieval"
    args = ["eval", "--data-dir", str(eval_corpus.data_dir), "--tenant", "squad", "--questions", str(path), "--ingest",
            "--retrieval-only", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert "answers" not in results and results["retrieval"]["summary"]["hybrid"]["hit@1"] == 1.0
    assert main(args) == 0  # a second run finds the corpus ingested already


def test_user_mistakes_are_one_line_errors(eval_corpus, tmp_path, capsys):
    base = ["eval", "--data-dir", str(eval_corpus.data_dir), "--questions", str(QUESTIONS), "--out", str(tmp_path / "x")]
    assert main(base) != 0
    assert "needs --tenant T" in capsys.readouterr().err
    assert main([*base, "--tenant", "acme", "--modes", "rag,adapter"]) != 0
    assert "no --adapter NAME" in capsys.readouterr().err
    assert main([*base, "--tenant", "acme", "--modes", "base,oracle"]) != 0
    assert "unknown answer mode 'oracle'" in capsys.readouterr().err
    assert main([*base, "--tenant", "nobody", "--generator", "extractive"]) != 0
    assert "tenant 'nobody' has no index" in capsys.readouterr().err
    assert main([*base, "--tenant", "acme", "--generator", "extractive", "--adapter", "missing"]) != 0
    assert "adapter 'missing' is not available" in capsys.readouterr().err
    extractive = [*base, "--tenant", "acme", "--generator", "extractive"]
    assert main([*extractive, "--modes", "rag", "--k", "0"]) != 0
    assert "--k 0: passages per answer must be at least 1" in capsys.readouterr().err
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert main([*extractive, "--retrieval-only", "--out", str(a_file)]) != 0  # refused before evaluating
    assert f"report directory {str(a_file)!r} is a file" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: one line naming the flag, exit 2
        main([*extractive, "--retrieval-only", "--limit", "-1"])
    assert "--limit: -1 is negative" in capsys.readouterr().err


@pytest.mark.slow
def test_against_a_real_server_through_the_openai_client(eval_corpus, tmp_path):
    from server.app import create_app
    from server.background import serving
    from server.generation.factory import load_generator
    from server.settings import GenerationSettings, ServerSettings

    settings = ServerSettings(data_dir=eval_corpus.data_dir)
    generator = load_generator(GenerationSettings(model=None))
    out = tmp_path / "http"
    with serving(create_app(settings, retrieval=eval_corpus.retrieval, generator=generator)) as base_url:
        assert main([
            "eval", "--data-dir", str(eval_corpus.data_dir), "--server", base_url, "--api-key", eval_corpus.api_key,
            "--questions", str(QUESTIONS), "--adapter", ADAPTER, "--out", str(out), "--no-progress",
        ]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["backend"].startswith("server http://127.0.0.1")
    assert list(results["answers"]["summary"]) == FOUR and results["generator"] == "extractive"
    assert results["answers"]["summary"]["rag"]["citation_recall"] > 0.5
    assert results["retrieval"]["summary"]["dense"]["hit@10"] > 0
