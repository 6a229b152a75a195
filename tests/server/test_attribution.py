"""Post-hoc attribution with the real embedder: sentences, markers kept, moved, added or dropped, abstention."""

import pytest

from core.records import Chunk, Passage
from server.attribution.attributor import Attributor
from server.attribution.sentences import split_sentences
from server.settings import AttributionSettings

WARRANTY = ("Every Kestrel Tide buoy comes with a three-year limited warranty covering defects in materials and "
            "workmanship. The warranty does not cover damage from ice or collisions.")
RETURNS = "Unused products can be returned within 30 days of delivery for a full refund."
PH = "Calibrate the pH probe every 90 days with the two-point buffer kit."


def passage(text: str, source: str, page: int = 1) -> Passage:
    chunk = Chunk(id=source, tenant="acme", document_id=source, source=source, page=page, start=0, end=len(text),
                  text=text)
    return Passage(chunk=chunk, score=1.0)


@pytest.fixture(scope="module")
def attributor():
    from core.settings import EmbeddingSettings
    from retrieval.embedder import Embedder

    embedder = Embedder(EmbeddingSettings())
    return Attributor(embedder.embed_documents, AttributionSettings())


PASSAGES = [passage(RETURNS, "returns.txt"), passage(WARRANTY, "warranty.txt"), passage(PH, "maintenance.md")]


def test_sentences_split_after_markers_but_not_inside_numbers_or_abbreviations():
    text = "The sensor reads 3.5 mg/L, e.g. at 20 C. [1] It was calibrated by Dr. Smith in 2024. Done!"
    pieces = [text[start:end] for start, end in split_sentences(text)]
    assert pieces == ["The sensor reads 3.5 mg/L, e.g. at 20 C. [1]", "It was calibrated by Dr. Smith in 2024.", "Done!"]


def test_an_answer_without_markers_gets_the_passage_that_supports_it(attributor):
    proof = attributor.attribute("The buoy has a three-year limited warranty.", PASSAGES, question="How long is the warranty?")
    assert proof.text == "The buoy has a three-year limited warranty [2]."
    [sentence] = proof.sentences
    assert sentence.supported and sentence.citations == (2,) and proof.cited == [2]
    assert proof.text[sentence.start:sentence.end] == proof.text


def test_a_marker_to_a_passage_that_does_not_support_its_sentence_is_moved(attributor):
    proof = attributor.attribute("Calibrate the pH probe every 90 days [1].", PASSAGES, question="pH calibration?")
    assert proof.text == "Calibrate the pH probe every 90 days [3]." and proof.cited == [3]


def test_a_wrong_value_is_not_supported_and_loses_its_marker(attributor):
    proof = attributor.attribute("Products can be returned within 45 days [1].", PASSAGES, question="Return window?")
    [sentence] = proof.sentences
    assert not sentence.supported and sentence.claim and sentence.citations == ()
    assert proof.text == "Products can be returned within 45 days." and proof.cited == []


def test_a_correct_marker_is_kept_and_each_sentence_is_judged_alone(attributor):
    answer = "Unused products can be returned within 30 days [1]. The moon is made of green cheese. Thanks!"
    proof = attributor.attribute(answer, PASSAGES, question="Can I return it?")
    first, second, third = proof.sentences
    assert first.supported and first.citations == (1,)
    assert second.claim and not second.supported  # flagged, not silently passed
    assert not third.claim and not third.supported  # too short to be a claim
    lead_in = attributor.attribute("Here is what the documents say about returns:", PASSAGES).sentences[0]
    assert not lead_in.claim and not lead_in.supported
    assert proof.text == answer
    for sentence in proof.sentences:  # spans index the final text
        assert proof.text[sentence.start:sentence.end].startswith(sentence.text.rstrip(".!"))


def test_grouped_and_range_markers_are_read_with_the_one_grammar(attributor):
    proof = attributor.attribute("Unused products can be returned within 30 days [1, 3].", PASSAGES)
    assert proof.sentences[0].citations == (1,)  # passage 3 (pH) does not support it: dropped from the group


def test_a_question_no_passage_answers_is_declined_and_an_answerable_one_is_not(attributor):
    decline, low = attributor.should_abstain("Who won the 1998 football world cup final?", PASSAGES)
    answer, high = attributor.should_abstain("How often should the pH probe be calibrated?", PASSAGES)
    assert decline and not answer and low < high


def test_the_question_words_no_passage_holds_count_by_their_rarity_in_the_index(attributor):
    """Answerability weighs a question's words by their rarity among the tenant's chunks (BM25's idf): a rare word
    no passage holds ("iPhone") pulls the score down more than plain word overlap did, while words that only shape
    the question ("how often", "should") are not held against it."""
    import numpy as np

    from retrieval.keyword import KeywordIndex

    texts = [p.chunk.text for p in PASSAGES]
    index = KeywordIndex(np.arange(len(texts)), texts)

    def scores(question):
        return (attributor.answerability(question, PASSAGES),
                attributor.answerability(question, PASSAGES, rarity=index.term_weights(question)))

    iphone_plain, iphone_rare = scores("What does the warranty cover for an iPhone?")
    often_plain, often_rare = scores("How often should the pH probe be calibrated?")
    assert iphone_rare < iphone_plain - 0.05  # the rarest word of the question is nowhere in the passages
    assert often_rare > often_plain  # every word that names something is there; "how often should" asks, not names
    assert often_rare - iphone_rare > often_plain - iphone_plain  # the two kinds of question move further apart
    assert index.term_weights("What does the warranty cover for an iPhone?").weights["iphon"] == \
        max(index.term_weights("What does the warranty cover for an iPhone?").weights.values())



def test_a_question_comparing_two_named_subjects_may_be_covered_by_two_passages_together(attributor):
    """Each subject of "Who died first, X or Y?" is in its own document: no one window covers the question, the
    best pair does. A question that compares nothing is never pooled, so two passages each holding part of it
    score as the better one alone."""
    import numpy as np

    from retrieval.keyword import KeywordIndex
    from server.attribution.support import PassageEvidence, answerability, compares_subjects

    courtenay = passage("Bryce Courtenay was a South African-born Australian novelist. He died on 22 November "
                        "2012 in Canberra.", "courtenay.txt")
    onetti = passage("Juan Carlos Onetti was a Uruguayan novelist and author of short stories. He died in Madrid "
                     "on 30 May 1994.", "onetti.txt")
    both = [courtenay, onetti]
    compared = "Who died first, Bryce Courtenay or Juan Carlos Onetti?"

    assert compares_subjects(compared) and compares_subjects("Are Pothos and Tibouchina both flowering plants?")
    assert not compares_subjects("How often should the pH probe be calibrated?")
    assert compares_subjects("Is the Marsilea or the Brabejum the larger genus?")
    assert compares_subjects('Which came first, "See Yourself" or "Within You Without You"?')
    assert not compares_subjects("Does the warranty cover ice or collision damage?")  # no names joined
    assert not compares_subjects("Kestrel or Osprey: which buoy floats?")  # the first word is no name
    # A question is user input (up to server.max_json_bytes): one pass over its words, no backtracking. A
    # pattern that retried every capital took minutes on these.
    assert not compares_subjects("A" * 200_000) and not compares_subjects("Aa " * 100_000)
    assert compares_subjects("Aa " * 100_000 + "or Bb")
    # A window pointing away from the question scores 0, not below: answerability is 0..1.
    unit = np.full(4, 0.5, dtype=np.float32)
    away = PassageEvidence.of("x", ["unrelated words"], unit[None])
    assert answerability("Who is older, Aa or Bb?", -unit, [away]) == 0
    texts = [p.chunk.text for p in [*PASSAGES, *both]]
    rarity = KeywordIndex(np.arange(len(texts)), texts).term_weights(compared)
    for weights in (None, rarity):  # plain word overlap, and the words weighted by their rarity in an index
        pooled = attributor.answerability(compared, both, rarity=weights)
        alone = max(attributor.answerability(compared, [p], rarity=weights) for p in both)
        assert pooled > alone + 0.1

    # The same words, asked without naming two subjects: each passage counts alone, as before.
    uncompared = "When did the novelist Courtenay die, and when did the novelist Onetti die?"
    assert not compares_subjects(uncompared)
    assert attributor.answerability(uncompared, both) == pytest.approx(
        max(attributor.answerability(uncompared, [p]) for p in both))

def test_a_document_tag_the_model_copied_from_its_prompt_is_dropped_and_the_copied_text_cited(attributor):
    # As SmolLM2-135M wrote for 18 of 292 questions (benchmarks/RESULTS.md): the prompt's block tag, then the passage.
    from core.prompt import format_documents, strip_prompt_markup

    tag = format_documents(PASSAGES[1:2]).splitlines()[1].replace('number="1"', 'number="2"')
    assert tag.startswith("<document number=\"2\"")
    draft = f"The answer is:\n{tag}\n{WARRANTY}\n</document>"
    text = strip_prompt_markup(draft)
    assert "<document" not in text and "</document>" not in text and WARRANTY in text
    proof = attributor.attribute(text, PASSAGES, question="How long is the buoy's warranty?")
    assert proof.cited == [2]
    assert strip_prompt_markup(f"Yes [2]. {tag[:30]}") == "Yes [2]."  # a tag cut off by max_tokens
    assert strip_prompt_markup("The <b>pump</b> runs.") == "The <b>pump</b> runs."  # other markup is the answer's



def test_a_streamed_answer_never_shows_a_document_tag_whatever_pieces_it_arrives_in():
    """The stream drops the tags piece by piece as strip_prompt_markup drops them from the whole answer: a tag
    split over pieces, one cut off by max_tokens, and never anything else ("x < y", "<documentation>")."""
    from core.prompt import StreamedMarkup, strip_prompt_markup

    def streamed(pieces):
        markup = StreamedMarkup()
        shown = [markup.feed(piece) for piece in pieces]
        return shown, "".join(shown) + markup.end()

    tag = '<document number="2" source="warranty.txt" page="1">'
    draft = f"The answer is:\n{tag}\n{WARRANTY}\n</document>"
    for size in (1, 3, 7, 50, len(draft)):  # every way of cutting it into pieces
        shown, text = streamed([draft[i:i + size] for i in range(0, len(draft), size)])
        assert "<doc" not in text and "</doc" not in text and WARRANTY in text
        assert text == f"The answer is:\n\n{WARRANTY}\n"
    shown, text = streamed(["Five years ", '<document number="1" sou'])  # cut off by max_tokens
    assert text == "Five years " and shown == ["Five years ", ""]
    shown, text = streamed(["x <", " y, a<b and <documentation> stay"])
    assert shown == ["x ", "< y, a<b and <documentation> stay"] and text == "x < y, a<b and <documentation> stay"
    assert streamed(["ends with <"])[1] == "ends with <"
    # A tag begun and left before a line break is no tag cut off at the end: both paths keep it (the whole
    # answer is also stripped of surrounding whitespace).
    broken = 'Five years <document number="3" x\n'
    assert streamed([broken])[1] == broken and strip_prompt_markup(broken) == broken.strip()


def test_a_draft_that_makes_no_checkable_claim_is_quoted_or_declined_like_an_unsupported_one(attributor):
    # "No." carries no proof: the client gets the passages' own sentences, cited, and the draft stays aside.
    from core.prompt import ABSTENTION_ANSWER
    from server.chat_service import QUOTE_HEADER, prove
    from server.generation.extractive import ExtractiveGenerator

    question = "Can unused products be returned for a full refund?"
    proof, text, cited = prove(attributor, ExtractiveGenerator(), "quote", "The answer is: No.", PASSAGES,
                               question=question, evidence=None, answerability=None)
    assert proof.quoted and proof.draft == "The answer is: No." and text.startswith(QUOTE_HEADER)
    assert cited == [1] and "30 days" in text
    declined, text, cited = prove(attributor, ExtractiveGenerator(), "decline", "Yes.", PASSAGES,
                                  question=question, evidence=None, answerability=None)
    assert declined.abstained and text == ABSTENTION_ANSWER and cited == []
    flagged, text, _ = prove(attributor, ExtractiveGenerator(), "flag", "Yes.", PASSAGES, question=question,
                             evidence=None, answerability=None)
    assert not flagged.quoted and not flagged.abstained and text == "Yes."


def test_a_quote_is_judged_without_the_document_name_that_introduces_it(attributor):
    # The name's words and digits are not in the passage's text; they must not count against the sentence.
    quote = ("According to kestrel-warranty-terms-2024-rev3.txt: Every Kestrel Tide buoy comes with a three-year "
             "limited warranty covering defects in materials and workmanship [2].")
    proof = attributor.attribute(quote, PASSAGES, question="How long is the warranty?")
    [sentence] = proof.sentences
    assert sentence.supported and sentence.citations == (2,) and proof.text == quote
    lead_in = attributor.attribute("According to the documents:", PASSAGES).sentences[0]
    assert not lead_in.claim  # a lead-in with nothing after it still claims nothing
