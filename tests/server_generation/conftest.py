"""Shared pieces for the generation tests: hand-written passages and the tiny model's tokenizer."""

import pytest

from core.records import Chunk, Passage


def make_passage(number: int, text: str, *, source: str = "manual.pdf", page: int = 1, score: float | None = None,
                 heading_path: tuple[str, ...] = ()) -> Passage:
    chunk = Chunk(
        id=f"chunk-{number}", tenant="acme", document_id=f"doc-{source}", source=source, page=page,
        start=10 * number, end=10 * number + len(text), text=text, heading_path=heading_path,
    )
    return Passage(chunk=chunk, score=1.0 / number if score is None else score, scores={"dense": 0.5})


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_llama_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_path)
