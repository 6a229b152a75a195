"""The extractive fallback: cited sentences that come from the passages they cite, and an honest empty answer."""

import asyncio
import re

import pytest

from evaluation.answer_metrics import is_abstention
from server.citations import extract_citations
from server.generation.extractive import (
    HEADER, NO_MATCH, NOT_SUPPORTED, NOTHING_FOUND, ExtractiveGenerator, approximate_tokens,
)
from core.prompt import CITATION_MARKER, ChatMessage
from server.generation.protocol import GenerationRequest, Generator, SamplingParams
from tests.server_generation.conftest import make_passage

PASSAGES = (
    make_passage(1, "Kestrel sensors ship with a calibration certificate. The warranty covers manufacturing "
                    "defects for two years from the date of purchase. Batteries are not covered."),
    make_passage(2, "Refunds are issued within fourteen days when the product is returned unused.\n\n"
                    "Shipping is free for orders over fifty euros."),
    make_passage(3, "The quarterly report shows revenue growth of twelve percent and stable operating margins."),
)


def ask(question: str, passages=PASSAGES):
    async def main():
        generator = ExtractiveGenerator()
        assert isinstance(generator, Generator) and generator.name == "extractive" and generator.kind == "extractive"
        stream = await generator.start(
            GenerationRequest(messages=(ChatMessage("user", question),), passages=tuple(passages))
        )
        deltas = [delta async for delta in stream.deltas]
        await generator.close()
        return stream, deltas

    return asyncio.run(main())


def test_answer_quotes_the_best_sentences_each_with_the_marker_of_its_passage():
    stream, deltas = ask("How long does the warranty cover manufacturing defects?")
    text = "".join(d.text for d in deltas)

    assert deltas[-1].finish_reason == "stop"
    assert "No generative model is loaded" in text  # never passes itself off as a model
    assert stream.prompt.passages_used == PASSAGES
    citations = extract_citations(text, stream.prompt.passages_used)
    assert citations and citations[0].number == 1
    for line in text.split("\n\n")[1:]:
        sentence, marker = line.rsplit(" [", 1)
        number = int(marker.rstrip("]"))
        assert sentence in PASSAGES[number - 1].chunk.text
    assert text.split("\n\n")[1].startswith("The warranty covers manufacturing defects for two years")


def test_sentences_from_several_passages_keep_their_own_numbers():
    _, deltas = ask("refunds for unused product returned, and revenue growth percent")
    text = "".join(d.text for d in deltas)

    assert "fourteen days when the product is returned unused. [2]" in text
    assert "revenue growth of twelve percent and stable operating margins. [3]" in text
    assert "Shipping is free" not in text


def test_without_passages_it_says_it_found_nothing_and_has_no_model():
    _, deltas = ask("How long is the warranty?", passages=())

    assert [d.text for d in deltas] == [NOTHING_FOUND]
    assert "nothing in the documents" in NOTHING_FOUND and "no generative model" in NOTHING_FOUND


def test_no_shared_word_still_cites_the_top_passage_and_says_so():
    _, deltas = ask("xylophone?")
    text = "".join(d.text for d in deltas)

    assert "shares a word" in text and text.endswith("[1]")


@pytest.mark.slow  # loads the real embedding model
def test_with_the_embedder_sentences_are_ranked_by_meaning():
    from retrieval.embedder import Embedder
    from core.settings import EmbeddingSettings

    generator = ExtractiveGenerator(embedder=Embedder(EmbeddingSettings()), max_sentences=1)
    pieces = generator.answer_pieces("How much money did the company make this quarter?", PASSAGES)

    assert pieces[1].strip() == ("The quarterly report shows revenue growth of twelve percent and stable operating "
                                 "margins. [3]")


def test_a_markdown_heading_is_not_quoted_as_an_answer():
    """A heading matches the question's words but states nothing; the sentence under it is the answer."""
    passages = (make_passage(1, "### Dissolved oxygen sensor accuracy\n\nThe dissolved oxygen sensor reads to "
                                "within 0.1 mg/L across its whole range of 0 to 20 mg/L."),)
    _, deltas = ask("What is the accuracy of the dissolved oxygen sensor?", passages=passages)
    text = "".join(d.text for d in deltas)
    assert "###" not in text
    assert "within 0.1 mg/L across its whole range of 0 to 20 mg/L. [1]" in text


def test_weak_matches_do_not_pad_the_answer():
    """Only sentences that match nearly as well as the best are quoted: a title sharing one word with the
    question is left out, even with room for more sentences."""
    passages = (make_passage(1, "Kestrel Instruments Ltd. - Returns Policy\n\nEvery Kestrel Tide buoy carries a "
                                "three-year limited warranty covering manufacturing defects."),)
    _, deltas = ask("How long is the warranty on a Kestrel Tide buoy?", passages=passages)
    text = "".join(d.text for d in deltas)
    assert "three-year limited warranty" in text
    assert "Returns Policy" not in text


def test_inflected_words_match_and_a_question_in_the_passage_is_never_the_quote():
    """Sentences are ranked on stems, as support is measured: "findings ... indicate" finds "finding ...
    indicated". The passage's own question shares the most words but states nothing, so the sentence that
    answers it is quoted instead. (Ranked on plain words, no sentence matched and nothing was quoted although
    support was 1.)"""
    passages = (make_passage(1, "What was the major finding of the trial? The finding indicated that two doses "
                                "halved the rate of severe disease."),)
    generator = ExtractiveGenerator(min_support=0.0)
    question = "What do the findings indicate?"

    assert generator.support(question, passages) == pytest.approx(1.0)
    assert generator.quote(question, passages) == [
        "\n\nThe finding indicated that two doses halved the rate of severe disease. [1]"]
    _, _, text = _answer(question, passages, generator=generator)
    assert "major finding of the trial?" not in text
    # The passage's question, sharing every word, sets no bar that the statement sharing one must reach.
    echoed = (make_passage(1, "What was the finding in this study? Two doses halved the rate of severe disease, "
                              "the study found."),)
    assert generator.quote("What was the finding in this study?", echoed) == [
        "\n\nTwo doses halved the rate of severe disease, the study found. [1]"]
    # When no statement matches, the top passage is shown from its first statement, not from its question.
    asked = (make_passage(1, "Is the trial finished? Enrolment closed in March."),)
    _, _, text = _answer("Which finished trial?", asked, generator=generator)
    assert text.startswith(NO_MATCH) and text.endswith("Enrolment closed in March. [1]")


def _answer(question: str, passages, *, generator=None, max_tokens: int = 256):
    """(stream, deltas, text) of one request to ``generator`` (default: ExtractiveGenerator())."""
    async def main():
        stream = await (generator or ExtractiveGenerator()).start(GenerationRequest(
            messages=(ChatMessage("user", question),), passages=tuple(passages),
            sampling=SamplingParams(max_tokens=max_tokens),
        ))
        return stream, [delta async for delta in stream.deltas]

    stream, deltas = asyncio.run(main())
    return stream, deltas, "".join(d.text for d in deltas)


def test_a_question_no_sentence_supports_is_declined_without_a_citation():
    """Sharing a word (warranty) is not support: the answer says the documents do not contain the answer,
    in words the evaluation counts as declining, and cites nothing."""
    _, deltas, text = _answer("What is the warranty on the electric scooter's motor?", PASSAGES)

    assert text == NOT_SUPPORTED and deltas[-1].finish_reason == "stop"
    assert "do not contain the answer" in text and is_abstention(text)
    assert not CITATION_MARKER.search(text)
    for declined in (NOTHING_FOUND, NO_MATCH):  # the other ways it declines are recognised too
        assert is_abstention(declined)


def test_support_is_high_for_the_answer_and_low_for_a_near_miss():
    generator = ExtractiveGenerator()
    answered = generator.support("How long does the warranty cover manufacturing defects?", PASSAGES)
    missed = generator.support("What is the warranty on the electric scooter's motor?", PASSAGES)

    assert answered == pytest.approx(1.0)  # every term of the question is in one sentence
    assert missed < generator.min_support <= answered
    assert generator.support("anything", ()) == 0.0


PAGED = (  # two pages of one PDF with a running header, page markers, page numbers and a table of contents
    make_passage(1, "Kestrel Tide Owner Manual - Warranty Terms\nPage 3 of 8\nContents\nWarranty terms ........ 3\n"
                    "Warranty claims ........ 4\nThe warranty covers the hull and the sensors for three years.\n3",
                 source="owner-manual.pdf", page=3),
    make_passage(2, "Kestrel Tide Owner Manual - Warranty Terms\nPage 4 of 8\nWarranty claims are repaired within "
                    "fifteen working days.\n- 4 -", source="owner-manual.pdf", page=4),
)


def test_page_headers_footers_numbers_and_contents_lines_are_never_quoted():
    _, _, text = _answer("What does the warranty cover?", PAGED)

    assert "The warranty covers the hull and the sensors for three years. [1]" in text
    for furniture in ("Owner Manual - Warranty Terms", "Page 3 of 8", "Page 4 of 8", "Contents", "....", "- 4 -"):
        assert furniture not in text
    for line in text.split("\n\n")[1:]:
        assert not re.match(r"\d+\b", line)  # no bare page number glued to the front of a sentence


def test_a_page_marker_inside_a_short_line_and_a_table_of_contents_without_leaders_are_left_out():
    passage = make_passage(1, "Table of Contents\nPart I - Returns and refunds 3\nPart II - Warranty and claims 7\n\n"
                              "Kestrel Instruments | Page 7 of 12\nRefunds are paid within fourteen days of the "
                              "returned product arriving.", source="policy.pdf", page=7)
    _, _, text = _answer("When are refunds for returns paid?", (passage,))

    assert "Refunds are paid within fourteen days of the returned product arriving. [1]" in text
    assert "Part I" not in text and "Page 7 of 12" not in text and "Kestrel Instruments |" not in text


CONFLICTING = (
    make_passage(1, "Unused products may be returned within 30 days of delivery for a full refund.",
                 source="/srv/lorag/tenants/acme/docs/policy-2024.md"),
    make_passage(2, "Unused products may be returned within 45 days of delivery for a full refund.",
                 source="/srv/lorag/tenants/acme/docs/policy-2025.md"),
)


def test_values_from_different_documents_each_name_their_document_never_its_path():
    _, _, text = _answer("Within how many days can unused products be returned for a full refund?", CONFLICTING)

    assert ("According to policy-2024.md: Unused products may be returned within 30 days of delivery for a full "
            "refund. [1]") in text
    assert ("According to policy-2025.md: Unused products may be returned within 45 days of delivery for a full "
            "refund. [2]") in text
    assert "/srv" not in text and "tenants" not in text


def test_documents_with_the_same_file_name_are_told_apart_by_their_folder():
    passages = (
        make_passage(1, "Unused products may be returned within 30 days of delivery.", source="/data/eu/policy.md"),
        make_passage(2, "Unused products may be returned within 60 days of delivery.", source="/data/us/policy.md"),
    )
    _, _, text = _answer("Within how many days can unused products be returned?", passages)

    assert "According to eu/policy.md: " in text and "According to us/policy.md: " in text
    assert "/data" not in text


def test_max_tokens_is_honoured_and_the_cut_falls_between_sentences():
    generator = ExtractiveGenerator()
    question = "Within how many days can unused products be returned for a full refund?"
    _, full, text = _answer(question, CONFLICTING, generator=generator)
    assert full[-1].finish_reason == "stop" and len(full) == 3  # the header and two quoted sentences
    budget = sum(d.tokens for d in full) - 1  # one token short of the whole answer

    _, deltas, cut = _answer(question, CONFLICTING, generator=generator, max_tokens=budget)
    assert deltas[-1].finish_reason == "length"
    assert sum(d.tokens for d in deltas) <= budget
    assert generator.count_tokens(cut) <= budget
    assert text.startswith(cut) and cut.endswith("]")  # whole sentences only, each with its marker

    _, deltas, tiny = _answer(question, CONFLICTING, generator=generator, max_tokens=3)
    assert deltas[-1].finish_reason == "length" and tiny and generator.count_tokens(tiny) <= 3
    assert HEADER.startswith(tiny)


def test_token_usage_is_counted_without_a_tokenizer():
    stream, deltas, text = _answer("How long does the warranty cover manufacturing defects?", PASSAGES)

    completion = sum(d.tokens for d in deltas)
    assert completion == approximate_tokens(text) > 0
    read = approximate_tokens("How long does the warranty cover manufacturing defects?")
    read += sum(approximate_tokens(p.chunk.text) for p in PASSAGES)
    assert stream.prompt.prompt_tokens == read > 0
    # Pieces of up to 6 word characters, and each punctuation mark: The warran-ty covers manufa-cturin-g defect-s .
    assert approximate_tokens("The warranty covers manufacturing defects.") == 10


def test_a_tokenizer_passed_in_counts_the_tokens(tiny_tokenizer):
    def count(text: str) -> int:
        return len(tiny_tokenizer.encode(text, add_special_tokens=False))

    generator = ExtractiveGenerator(count_tokens=count)
    stream, deltas, text = _answer("How long does the warranty cover manufacturing defects?", PASSAGES,
                                   generator=generator, max_tokens=40)

    assert sum(d.tokens for d in deltas) == sum(count(d.text) for d in deltas) <= 40
    assert deltas[-1].finish_reason == "length"
    question_tokens = count("How long does the warranty cover manufacturing defects?")
    assert stream.prompt.prompt_tokens == question_tokens + sum(count(p.chunk.text) for p in PASSAGES)
