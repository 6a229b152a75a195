"""Citation parsing: every marker form, dangling numbers, order of first use."""

from server.citations import clean_markers, extract_citations
from tests.server_generation.conftest import make_passage

PASSAGES = [make_passage(n, f"text {n}", source=f"doc{n}.pdf", page=n, heading_path=("H",)) for n in range(1, 5)]


def numbers(answer: str) -> list[int]:
    return [c.number for c in extract_citations(answer, PASSAGES)]


def test_all_marker_forms_resolve_in_order_of_first_use_each_once():
    assert numbers("Two years [2]. Also [1,3] and [4, 1].") == [2, 1, 3, 4]
    assert numbers("A [3][1] then [1][3].") == [3, 1]
    assert numbers("Range [1-3] and [2–4].") == [1, 2, 3, 4]
    assert numbers("Spaced [ 2 ,  4 ]") == [2, 4]
    assert numbers("No markers here.") == []


def test_markers_pointing_to_nothing_are_dropped():
    assert numbers("[0] [5] [7-9] [2, 12] [3-99999999999]") == [2, 3, 4]
    assert extract_citations("[1]", []) == []


def test_citation_carries_the_passage_fields():
    (citation,) = extract_citations("Covered [2].", PASSAGES)
    chunk = PASSAGES[1].chunk
    assert (citation.number, citation.passage_id, citation.source, citation.page) == (2, chunk.id, "doc2.pdf", 2)
    assert (citation.start, citation.end, citation.text) == (chunk.start, chunk.end, "text 2")
    assert citation.heading_path == ("H",) and citation.score == PASSAGES[1].score


def test_clean_markers_rewrites_partly_valid_and_removes_dangling():
    assert clean_markers("Covered [2, 9]. Unknown [9]. Fine [1-2].", 4) == "Covered [2]. Unknown. Fine [1, 2]."
    assert clean_markers("Nothing to do.", 4) == "Nothing to do."
