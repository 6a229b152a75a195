"""An answer split into sentences, the unit whose support by a passage is checked and reported."""

import re

from core.prompt import CITATION_MARKER

_ABBREVIATIONS = frozenset(
    """e.g i.e etc al vs cf fig figs eq eqs ref refs no nos vol pp p ca approx dr mr mrs ms prof sr jr st
    inc ltd co corp dept univ est min max avg std resp suppl tab sec ch ed eds jan feb mar apr jun jul aug sep
    sept oct nov dec u.s u.k e.u a.m p.m ph.d""".split()
)
# End of a sentence: terminal punctuation, closing quotes/brackets, then any citation markers that belong to it.
_END = re.compile(
    r"[.!?]+[\"'\u201d\u2019)\]]*(?:\s*" + CITATION_MARKER.pattern + r")*"
    r"(?=\s+[\"'\u201c\u2018(\[]?[A-Z0-9]|\s*$)"
)
# A blank line or a new list item always ends a sentence.
_HARD_BREAK = re.compile(r"\n\s*\n|\n(?=\s*(?:[-*\u2022]|\d+[.)])\s)")


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Stripped ``(start, end)`` spans of the sentences of ``text``, in order.

    Splits after . ! ? when whitespace and a capital, digit, quote or bracket follow; keeps a trailing ``[n]``
    (``...end. [2] Next``) with the sentence before it; never splits inside numbers (3.5), after common
    abbreviations (e.g., et al., Fig.) or single-letter initials.
    """
    cuts = [match.end() for match in _END.finditer(text)
            if not (text[match.start()] == "." and _is_abbreviation(text, match.start()))]
    cuts += [match.start() for match in _HARD_BREAK.finditer(text)]
    spans, position = [], 0
    for cut in sorted(set(cuts)) + [len(text)]:
        if cut <= position:
            continue
        piece = text[position:cut]
        if piece.strip():
            lead = len(piece) - len(piece.lstrip())
            spans.append((position + lead, position + len(piece.rstrip())))
        position = cut
    return spans


def _is_abbreviation(text: str, dot: int) -> bool:
    start = dot
    while start > 0 and (text[start - 1].isalpha() or text[start - 1] == "."):
        start -= 1
    word = text[start:dot].lower()
    if not word:
        return False
    if word in _ABBREVIATIONS:
        return True
    if len(word) == 1 and text[start].isupper():
        # "J. Smith" and "John F. Kennedy" go on; "mg/L." and "vitamin A." end a sentence.
        if start > 0 and not text[start - 1].isspace():
            return False
        previous = text[:start].split()[-1:] or [""]
        return not previous[0] or previous[0][0].isupper()
    return False
