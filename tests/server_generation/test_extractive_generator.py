"""The extractive fallback: cited sentences that come from the passages they cite, and an honest empty answer."""

import asyncio

import pytest

from server.citations import extract_citations
from server.generation.extractive import NOTHING_FOUND, ExtractiveGenerator
from core.prompt import ChatMessage
from server.generation.protocol import GenerationRequest, Generator
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
