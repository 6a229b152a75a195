"""Resolves the [n] markers of an answer to the numbered passages of its prompt.

Markers come as [1], [1,3], [1, 3], [1][3] and [1-3]; numbers that point to no passage are
dropped. Run it on the full text once a stream has ended, since a marker may span two deltas.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass

from core.prompt import CITATION_MARKER, marker_numbers
from core.records import Passage


@dataclass(frozen=True)
class Citation:
    """One passage an answer cites, numbered as in the prompt."""

    number: int
    passage_id: str  # the chunk id
    source: str
    page: int
    start: int
    end: int
    heading_path: tuple[str, ...]
    score: float
    text: str


def extract_citations(answer: str, passages: Sequence[Passage]) -> list[Citation]:
    """The passages ``answer`` cites, in order of first use, each once (``passages[i]`` is [i + 1])."""
    seen: dict[int, Citation] = {}
    for match in CITATION_MARKER.finditer(answer):
        for number in marker_numbers(match.group(), len(passages)):
            if number not in seen:
                seen[number] = _citation(number, passages[number - 1])
    return list(seen.values())


def clean_markers(answer: str, passage_count: int) -> str:
    """``answer`` with each marker reduced to the numbers that point to a passage.

    ``[2, 9]`` becomes ``[2]`` when there are three passages; ``[9]`` is removed together with the
    space before it. Text without markers is returned unchanged.
    """

    def rewrite(match: re.Match) -> str:
        numbers = marker_numbers(match.group(), passage_count)
        if numbers:
            return "[" + ", ".join(str(n) for n in numbers) + "]"
        return ""

    pieces, position = [], 0
    for match in CITATION_MARKER.finditer(answer):
        replacement = rewrite(match)
        before = answer[position : match.start()]
        if not replacement:
            before = before.rstrip(" ")
        pieces.extend((before, replacement))
        position = match.end()
    pieces.append(answer[position:])
    return "".join(pieces)


def _citation(number: int, passage: Passage) -> Citation:
    chunk = passage.chunk
    return Citation(
        number=number,
        passage_id=chunk.id,
        source=chunk.source,
        page=chunk.page,
        start=chunk.start,
        end=chunk.end,
        heading_path=tuple(chunk.heading_path),
        score=passage.score,
        text=chunk.text,
    )
