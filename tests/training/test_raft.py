"""The RAFT builder: server-identical prompts, oracle citations, and the oracle-omitted case."""

import pytest

from core.errors import LoragError
from core.records import Chunk, Passage
from core.prompt import ChatMessage
from core.prompt import build_prompt
from training.data import Example
from training.raft import build_raft_examples, cite, find_oracle
from training.settings import TrainingSettings

CORPUS = {
    "warranty": "Every Kestrel Tide buoy carries a three-year limited warranty.",
    "battery": "The battery is covered for five years or 2,000 cycles.",
    "interval": "The default interval is ten minutes.",
    "api": "Requests are limited to 600 per minute per API token.",
    "price": "The Standard plan costs 15 EUR per buoy per month.",
}
QUESTIONS = {
    "warranty": ("How long is the warranty?", "A three-year limited warranty."),
    "interval": ("What is the default interval?", "The default interval is ten minutes."),
    "api": ("How many API requests are allowed?", "600 per minute per API token."),
}


def passage(key: str, score: float) -> Passage:
    chunk = Chunk(id=key, tenant="acme", document_id=f"doc-{key}", source=f"{key}.txt", page=1, start=0,
                  end=len(CORPUS[key]), text=CORPUS[key])
    return Passage(chunk, score)


def retrieve(question: str) -> list[Passage]:
    """Hand-made retrieval: the matching passage first, then a fixed neighbour."""
    key = next(k for k, (q, _) in QUESTIONS.items() if q == question)
    neighbour = {"warranty": "battery", "interval": "price", "api": "price"}[key]
    return [passage(key, 0.9), passage(neighbour, 0.5)]


def examples() -> list[Example]:
    return [Example((ChatMessage("user", q), ChatMessage("assistant", a)), line=n) for n, (q, a) in enumerate(QUESTIONS.values(), 1)]


def test_prompt_is_build_prompts_and_the_answer_cites_the_oracle():
    settings = TrainingSettings(k=3, raft_no_oracle_p=0.0, raft_distractors=1, seed=0)
    built = build_raft_examples(examples(), retrieve, settings=settings)
    assert len(built) == 3
    for example, raft in zip(examples(), built):
        served = build_prompt(list(example.messages[:-1]), raft.passages)
        assert raft.messages[:-1] == served.messages  # byte-identical to what the server sends
        assert len(raft.passages) == 3
        (number,) = raft.oracle_numbers
        oracle = raft.passages[number - 1]
        assert oracle.chunk.id == retrieve(example.question)[0].chunk.id
        answer = raft.messages[-1]
        assert answer["role"] == "assistant" and f"[{number}]" in answer["content"]
        assert f'<document number="{number}" source="{oracle.chunk.source}"' in served.messages[-1]["content"]
        # Distractors come from other questions' retrievals.
        own = {p.chunk.id for p in retrieve(example.question)}
        assert any(p.chunk.id not in own for p in raft.passages)


def test_oracle_omitted_examples_say_the_documents_do_not_contain_it():
    settings = TrainingSettings(k=3, raft_no_oracle_p=1.0, raft_distractors=2, seed=0)
    built = build_raft_examples(examples(), retrieve, settings=settings)
    for example, raft in zip(examples(), built):
        oracle_id = retrieve(example.question)[0].chunk.id
        assert oracle_id not in {p.chunk.id for p in raft.passages}
        assert raft.oracle_numbers == []
        assert raft.messages[-1]["content"] == settings.raft_no_answer
        assert raft.messages[:-1] == build_prompt(list(example.messages[:-1]), raft.passages).messages


def test_same_seed_same_examples_and_some_oracles_dropped_at_half():
    settings = TrainingSettings(k=2, raft_no_oracle_p=0.5, seed=7)
    first = build_raft_examples(examples() * 4, retrieve, settings=settings)
    second = build_raft_examples(examples() * 4, retrieve, settings=settings)
    assert [r.messages for r in first] == [r.messages for r in second]
    omitted = sum(not r.oracle_numbers for r in first)
    assert 0 < omitted < len(first)


def test_budget_drops_passages_before_the_answer(tiny_llama_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    settings = TrainingSettings(k=3, raft_no_oracle_p=0.0, seed=0)
    roomy = build_raft_examples(examples()[:1], retrieve, settings=settings, tokenizer=tokenizer, max_seq_len=4096)[0]
    full = len(tokenizer.apply_chat_template(roomy.messages, tokenize=True, return_dict=True)["input_ids"])
    tight = build_raft_examples(examples()[:1], retrieve, settings=settings, tokenizer=tokenizer, max_seq_len=full - 10)[0]
    assert len(tight.passages) < len(roomy.passages)
    assert len(tokenizer.apply_chat_template(tight.messages, tokenize=True, return_dict=True)["input_ids"]) <= full - 10


def test_no_passages_at_all_is_a_clear_error():
    with pytest.raises(LoragError, match="ingest"):
        build_raft_examples(examples(), lambda question: [], settings=TrainingSettings())


def test_oracle_and_citation_helpers():
    hits = [passage("battery", 0.9), passage("interval", 0.5)]
    assert [p.chunk.id for p in find_oracle(hits, "The default interval is ten minutes.")] == ["interval"]
    assert [p.chunk.id for p in find_oracle(hits, "Something else entirely.")] == ["battery"]
    assert cite("Ten minutes [4].", [2]) == "Ten minutes [2]."
    assert cite("Ten minutes", [1, 3]) == "Ten minutes [1][3]"
