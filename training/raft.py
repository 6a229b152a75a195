"""Retrieval-augmented fine-tuning examples (RAFT): the question with retrieved passages, as the server shows them.

Each example gets its "oracle" passages (those containing the answer, else the top hit) plus distractors
retrieved for other questions, numbered by the server's ``build_prompt``; the answer cites the oracle's
[n]. A share of examples has the oracle left out and learns to say the documents do not contain the answer.
"""

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from core.errors import LoragError
from core.prompt import strip_markers
from core.records import Passage
from training.data import Example
from training.settings import TrainingSettings

_TRAILING_PUNCTUATION = re.compile(r"([.!?]+)$")


@dataclass(frozen=True)
class RaftExample:
    messages: list[dict[str, str]]  # build_prompt's messages + the assistant answer
    passages: list[Passage]  # as numbered in the prompt: passages[i] is [i + 1]
    oracle_numbers: list[int]  # the [n] the answer cites; empty when the oracle was left out
    line: int


def build_raft_examples(
    examples: Sequence[Example],
    retrieve: Callable[[str], list[Passage]],
    *,
    settings: TrainingSettings,
    tokenizer=None,
    max_seq_len: int | None = None,
) -> list[RaftExample]:
    """Turn question/answer examples into RAFT examples with ``settings.k`` passages each.

    ``retrieve(question)`` returns passages best first (the tenant's retriever). The same ``settings.seed``
    gives the same passages, order and left-out oracles. With ``tokenizer`` and ``max_seq_len`` the prompt
    is fitted by ``build_prompt`` so the answer still fits (lowest-ranked passages are dropped first).

    Raises:
        LoragError: retrieval finds nothing for any question (the tenant has no index).
    """
    from core.prompt import build_prompt

    rng = random.Random(settings.seed)
    hits = [list(retrieve(example.question)) for example in examples]
    if not any(hits):
        raise LoragError(
            "--with-retrieval: retrieval returned no passages for any training question",
            hint="Ingest the tenant's documents first with `lorag ingest PATH --tenant T`",
        )
    built = []
    for index, example in enumerate(examples):
        own = hits[index]
        oracle = find_oracle(own, example.answer)
        oracle_ids = {p.chunk.id for p in oracle}
        own_ids = {p.chunk.id for p in own}
        others = [p for p in own if p.chunk.id not in oracle_ids]
        pool = _unique(p for j, found in enumerate(hits) if j != index for p in found if p.chunk.id not in own_ids)
        distractors = rng.sample(pool, min(settings.raft_distractors, len(pool)))
        omit_oracle = rng.random() < settings.raft_no_oracle_p
        context = _unique([*([] if omit_oracle else oracle), *distractors, *others])[: settings.k]
        rng.shuffle(context)  # the oracle must not always be [1]

        budget = None
        if tokenizer is not None and max_seq_len is not None:
            answer_tokens = len(tokenizer(example.answer, add_special_tokens=False)["input_ids"])
            budget = max_seq_len - answer_tokens - 8  # room for the citation marks and end-of-turn tokens
        try:
            prompt = build_prompt(example.messages[:-1], context, tokenizer=tokenizer, max_prompt_tokens=budget)
        except LoragError:  # not even the question fits: keep every passage, truncation will count it
            prompt = build_prompt(example.messages[:-1], context)
        numbers = [n for n, p in enumerate(prompt.passages, start=1) if p.chunk.id in oracle_ids]
        if not numbers:
            answer = settings.raft_no_answer
        else:
            answer = cite(example.answer, numbers) if settings.raft_cite else strip_markers(example.answer)
        built.append(RaftExample([*prompt.messages, {"role": "assistant", "content": answer}], prompt.passages, numbers, example.line))
    return built


def find_oracle(passages: Sequence[Passage], answer: str) -> list[Passage]:
    """Passages whose text contains the answer (case and spacing ignored), else the top hit alone."""
    needle = _normalise(_TRAILING_PUNCTUATION.sub("", strip_markers(answer).strip()))
    containing = [p for p in passages if needle and needle in _normalise(p.chunk.text)]
    return containing or list(passages[:1])


def cite(answer: str, numbers: Sequence[int]) -> str:
    """``answer`` with any old [n] marks removed and ``[a][b]`` added before its final punctuation."""
    marks = "".join(f"[{n}]" for n in numbers)
    text = strip_markers(answer).rstrip()
    match = _TRAILING_PUNCTUATION.search(text)
    if match:
        return f"{text[: match.start()]} {marks}{match.group(1)}"
    return f"{text} {marks}"


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def _unique(passages) -> list[Passage]:
    seen, kept = set(), []
    for passage in passages:
        if passage.chunk.id not in seen:
            seen.add(passage.chunk.id)
            kept.append(passage)
    return kept
