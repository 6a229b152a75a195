"""Splits pages into token-sized chunks with exact character spans and stable content-hash ids.

Splitting is langchain's RecursiveCharacterTextSplitter measured in the embedder's own tokens, so a
chunk fits the embedder's window; each chunk records where it sits in its page (page_text[start:end])
and the sentence windows that are embedded for it (ingest.windows), with the line naming its document and
section (``Chunk.context``) that its vectors and keyword terms include. Page furniture (``Page.furniture``) is
never part of a chunk: the text between furniture lines is chunked piece by piece.
"""

import hashlib
from collections.abc import Iterator, Sequence
from functools import lru_cache

from ingest.loaders import Page, Section
from ingest.windows import window_spans
from core.settings import ChunkingSettings
from core.records import Chunk

# Whitespace the splitter may strip between two chunks, for locating the next chunk (see Chunker.spans).
_MAX_GAP = 64
# A context line names the title and at most this many of the innermost headings, each cut to HEADING_CHARS:
# it stands beside every window of the chunk, so it stays short.
CONTEXT_HEADINGS = 2
HEADING_CHARS = 60


def chunk_id_of(tenant: str, document_id: str, page: int, start: int, end: int, text: str) -> str:
    """Stable id: the same text at the same place of the same file always gets the same id."""
    key = "\x1f".join((tenant, document_id, str(page), str(start), str(end), text))
    return hashlib.sha256(key.encode("utf-8", errors="surrogatepass")).hexdigest()[:32]


def context_line(title: str, heading_path: Sequence[str]) -> str:
    """``"<title> > <heading> > <subheading>"``: what a chunk belongs to (``Chunk.context``).

    A first heading that repeats the title (Markdown's ``# Title``) is named once; deeper paths keep their
    innermost CONTEXT_HEADINGS headings, where the words that tell sections apart are.
    """
    headings = [" ".join(heading.split()) for heading in heading_path]
    if headings and title and headings[0].casefold() == title.casefold():
        headings = headings[1:]
    headings = [_cut(heading, HEADING_CHARS) for heading in headings[-CONTEXT_HEADINGS:] if heading]
    return " > ".join([title, *headings] if title else headings)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0]


def check_chunking(settings: ChunkingSettings) -> None:
    """Raises:
        LoragError: the overlap is not smaller than the chunk size.
    """
    if settings.overlap_tokens >= settings.chunk_tokens:
        from core.errors import LoragError

        raise LoragError(
            f"chunking.overlap_tokens ({settings.overlap_tokens}) must be smaller than "
            f"chunking.chunk_tokens ({settings.chunk_tokens})"
        )


class Chunker:
    """Splits page text with one splitter per process (the tokenizer length cache is shared across files)."""

    def __init__(self, tokenizer, settings: ChunkingSettings):
        from langchain_text_splitters import RecursiveCharacterTextSplitter

        check_chunking(settings)
        self.settings = settings
        self.count_tokens = _cached_token_counter(tokenizer)
        # What RecursiveCharacterTextSplitter.from_huggingface_tokenizer builds, with a cached length
        # function: the splitter measures every word (and every character of a gigantic unbroken line)
        # separately, and those pieces repeat endlessly.
        self.splitter = RecursiveCharacterTextSplitter(
            chunk_size=settings.chunk_tokens,
            chunk_overlap=settings.overlap_tokens,
            length_function=self.count_tokens,
        )

    def split_pages(
        self, pages: Sequence[Page], *, tenant: str, document_id: str, source: str, title: str = ""
    ) -> Iterator[Chunk]:
        """Chunks of every page in reading order; Markdown/HTML sections are split separately, and so are the
        stretches of a page between its furniture lines. With ``chunking.window_context``, each chunk's
        ``context`` names ``title`` and its heading path (empty when there are neither)."""
        for page in pages:
            for section in _merge_bare_headings(page):
                context = context_line(title, section.heading_path) if self.settings.window_context else ""
                for start, end in self._section_spans(page, section):
                    text = page.text[start:end]
                    windows = self.windows(page.text, start, end)
                    yield Chunk(
                        id=chunk_id_of(tenant, document_id, page.number, start, end, text),
                        tenant=tenant,
                        document_id=document_id,
                        source=source,
                        page=page.number,
                        start=start,
                        end=end,
                        text=text,
                        heading_path=section.heading_path,
                        windows=windows,
                        context=context,
                    )

    def windows(self, text: str, start: int, end: int) -> tuple[tuple[int, int], ...]:
        """Offsets into ``text`` of the windows embedded for the chunk ``text[start:end]``; empty when
        ``chunking.window_tokens`` is 0 (the whole chunk is embedded)."""
        if not self.settings.window_tokens:
            return ()
        spans = window_spans(
            text, start, end, window_tokens=self.settings.window_tokens, count_tokens=self.count_tokens
        )
        return tuple(spans)

    def _section_spans(self, page: Page, section: Section) -> Iterator[tuple[int, int]]:
        for start, end in _without_furniture(section.start, section.end, page.furniture):
            yield from self.spans(page.text, start, end)

    def spans(self, text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
        """``(start, end)`` offsets into ``text`` of the chunks of ``text[start:end]``."""
        piece = text[start:end]
        if not piece.strip():
            return
        cursor = previous_end = 0
        for chunk_text in self.splitter.split_text(piece):
            # The splitter returns stripped substrings in order. With overlap the next one starts after
            # the previous start and no later than the previous end (plus stripped whitespace). Taking
            # the last match in that window keeps repetitive text ("xxxx...") moving forward.
            gap = piece[previous_end : previous_end + _MAX_GAP]
            latest_start = previous_end + len(gap) - len(gap.lstrip())
            found = piece.rfind(chunk_text, cursor, latest_start + len(chunk_text))
            if found < 0:
                found = piece.find(chunk_text, cursor)
            if found < 0:  # repetitive text tiled too far ahead: any occurrence has the same text
                found = piece.rfind(chunk_text)
            if found < 0:  # cannot happen for substrings; refuse rather than record a wrong span
                raise ValueError(f"chunk not found in its page text: {chunk_text[:60]!r}")
            yield start + found, start + found + len(chunk_text)
            cursor, previous_end = found + 1, found + len(chunk_text)


def _without_furniture(start: int, end: int, furniture: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The stretches of ``[start, end)`` outside every furniture span (spans sorted and disjoint)."""
    stretches = []
    for skip_start, skip_end in furniture:
        if skip_end <= start or skip_start >= end:
            continue
        if skip_start > start:
            stretches.append((start, skip_start))
        start = max(start, skip_end)
    if end > start:
        stretches.append((start, end))
    return stretches


def _merge_bare_headings(page: Page) -> list[Section]:
    """The page's sections, a heading with no text of its own joined to the section after it.

    ``# Guide`` directly followed by ``## Setup`` would otherwise become a chunk of two words.
    """
    if not page.sections:
        return [Section(0, len(page.text), ())]
    merged: list[Section] = []
    carried: int | None = None  # start of bare headings waiting for their first section with text
    for position, section in enumerate(page.sections):
        body = page.text[section.start : section.end].split("\n", 1)[1:]
        start = section.start if carried is None else carried
        if not "".join(body).strip() and position + 1 < len(page.sections):
            carried = start
            continue
        merged.append(Section(start, section.end, section.heading_path))
        carried = None
    return merged


def _cached_token_counter(tokenizer):
    # A private copy of the Rust tokenizer: same ids as tokenizer.tokenize(), several times faster, no
    # "longer than the model maximum" warning, and safe in the parsing thread while the embedder (on
    # the main thread) switches padding and truncation on the shared one.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(backend.to_str())
        backend.no_padding()
        backend.no_truncation()

    def measure(text: str) -> int:
        if backend is not None:
            return len(backend.encode(text, add_special_tokens=False).ids)
        return len(tokenizer.tokenize(text))

    cached = lru_cache(maxsize=1 << 16)(measure)

    def count_tokens(text: str) -> int:
        # Long strings are rarely repeated: do not let them evict the short, frequent ones.
        return cached(text) if len(text) <= 64 else measure(text)

    return count_tokens
