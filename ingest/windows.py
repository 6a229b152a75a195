"""Splits a chunk into the short sentence windows that are embedded for it (one vector per window).

Why: a question usually targets one sentence, and one vector for a whole 200-token chunk dilutes that
sentence among the others. A chunk scores by its best window instead (retrieval.index). Windows are whole
sentences packed up to ``window_tokens``; they tile the chunk without overlap, so embedding them costs about
the tokens of the chunk itself.
"""

import re
from collections.abc import Callable

# A sentence ends at . ! or ? followed by whitespace and something that can start a sentence; a blank line
# (paragraph, list or table break) also ends one. Abbreviations ("et al. 2019") may split early: harmless,
# packing joins the pieces again when they fit.
_BOUNDARY = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])|\n\s*\n")
_WORD = re.compile(r"\S+")


def window_spans(
    text: str, start: int, end: int, *, window_tokens: int, count_tokens: Callable[[str], int]
) -> list[tuple[int, int]]:
    """``(start, end)`` offsets into ``text`` of the windows of ``text[start:end]``, in reading order.

    Sentences are packed greedily while the window stays within ``window_tokens``; a longer sentence is cut
    between words. Token counts of pieces are added up (a word-piece tokenizer never joins two words across
    whitespace, so the sum is the count of the joined text). Windows are stripped and never empty.
    """
    pieces: list[tuple[int, int, int]] = []  # (start, end, tokens)
    for sentence_start, sentence_end in _sentences(text, start, end):
        tokens = count_tokens(text[sentence_start:sentence_end])
        if tokens <= window_tokens:
            pieces.append((sentence_start, sentence_end, tokens))
        else:
            pieces.extend(
                (word.start(), word.end(), count_tokens(word.group()))
                for word in _WORD.finditer(text, sentence_start, sentence_end)  # offsets into all of text
            )
    windows: list[tuple[int, int]] = []
    current: list[int] | None = None  # [start, end, tokens] of the window being filled
    for piece_start, piece_end, tokens in pieces:
        if current is not None and current[2] + tokens <= window_tokens:
            current[1], current[2] = piece_end, current[2] + tokens
            continue
        if current is not None:
            windows.append((current[0], current[1]))
        current = [piece_start, piece_end, tokens]
    if current is not None:
        windows.append((current[0], current[1]))
    return windows


def _sentences(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """Stripped, non-empty sentence spans of ``text[start:end]``."""
    spans, position = [], start
    for boundary in _BOUNDARY.finditer(text, start, end):
        spans.append((position, boundary.start()))
        position = boundary.end()
    spans.append((position, end))
    stripped = []
    for span_start, span_end in spans:
        piece = text[span_start:span_end]
        if piece.strip():
            lead = len(piece) - len(piece.lstrip())
            stripped.append((span_start + lead, span_start + len(piece.rstrip())))
    return stripped
