"""A passage supports a sentence only if it states the sentence's values: numbers with their units."""

import pytest

from core.records import Chunk, Passage
from server.attribution.attributor import Attributor
from server.attribution.numeric import Value, passage_mentions, sentence_values, states_values
from server.settings import AttributionSettings

BATTERY = ("Every Kestrel Tide buoy carries a three-year limited warranty covering manufacturing defects in the "
           "hull, electronics and sensors. The battery is covered for five years or 2,000 cycles, whichever comes "
           "first.")
EXTENSION = "Customers on the Fleet plan may extend the warranty for EUR 120 per buoy per year."


def passage(text: str, source: str) -> Passage:
    chunk = Chunk(id=source, tenant="acme", document_id=source, source=source, page=1, start=0, end=len(text),
                  text=text)
    return Passage(chunk=chunk, score=1.0)


@pytest.fixture(scope="module")
def attributor():
    from core.settings import EmbeddingSettings
    from retrieval.embedder import Embedder

    return Attributor(Embedder(EmbeddingSettings()).embed_documents, AttributionSettings())


def stated(sentence: str, text: str = BATTERY) -> bool:
    return states_values(sentence_values(sentence), passage_mentions(text))


def test_values_are_numbers_with_their_units_in_digits_or_words():
    assert sentence_values("It lasts twenty-five days, holds 0.50 mg/L and 3.50%, and costs $5 or 12 per cent.") == {
        Value("25", "day"), Value("0.5", "mg/l"), Value("3.5", "%"), Value("5", "usd"), Value("12", "%")}
    # names, file names and list enumerators carry no value; a sentence's "one" is not one
    assert sentence_values("1. SARS-CoV-2 and COVID-19 are named in covid-12.txt, one of the files.") == set()


def test_a_passage_must_state_the_number_with_the_same_unit():
    assert stated("The battery is covered for 5 years.")  # "five years"
    assert stated("The buoy has a 3-year warranty.")  # "three-year"
    assert stated("The battery lasts 2,000 cycles.")
    assert not stated("The battery is covered for 2,000 years.")  # 2,000 is there, but as cycles
    assert not stated("The battery is covered for four years.")
    assert stated("The extension costs 120 EUR.", EXTENSION)  # "EUR 120"
    assert not stated("The extension costs 120 dollars.", EXTENSION)
    assert stated("The extension costs 120 a year.", EXTENSION)  # no unit given: the number is enough
    assert stated("The probe reads 7 units.", "pH range: 7\nAccuracy: 0.1")  # a table cell: no unit to differ


def test_a_value_the_passage_does_not_state_is_never_supported_even_when_the_model_cited_it(attributor):
    # Every word is in the passage and the number too, but as cycles: similarity alone supported it.
    proof = attributor.attribute("The battery is covered for 2,000 years [1].", [passage(BATTERY, "warranty.txt")],
                                 question="How long is the battery covered?")
    [sentence] = proof.sentences
    assert sentence.claim and not sentence.supported and sentence.citations == () and sentence.score == 0.0
    assert proof.text == "The battery is covered for 2,000 years." and proof.cited == []


def test_the_marker_moves_to_the_passage_that_states_the_value(attributor):
    passages = [passage(BATTERY, "warranty.txt"), passage(EXTENSION, "fleet.txt")]
    proof = attributor.attribute("The Fleet plan extends the warranty for 120 EUR per buoy per year [1].", passages,
                                 question="What does the warranty extension cost?")
    [sentence] = proof.sentences
    assert sentence.supported and sentence.citations == (2,) and proof.cited == [2]
    right = attributor.attribute("The battery is covered for 5 years or 2,000 cycles [1].", passages,
                                 question="How long is the battery covered?")
    assert right.sentences[0].supported and right.cited == [1]
