"""One loader per file format, each turning a file into numbered pages of plain text and a title.

Formats are chosen by extension and checked against the content (a PDF must start with ``%PDF-``),
so a mislabeled file fails with a clear reason instead of being indexed as garbage.
"""

import hashlib
import logging
import re
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from ingest.furniture import find_furniture
from ingest.settings import IngestSettings
from core.errors import LoragError

EXTENSIONS = {
    ".pdf": "pdf",
    ".md": "markdown",
    ".markdown": "markdown",
    ".txt": "text",
    ".text": "text",
    ".html": "html",
    ".htm": "html",
}


class LoadError(LoragError):
    """A file that cannot be turned into text; the message names the file and the reason."""


@dataclass(frozen=True)
class Section:
    """A stretch ``[start, end)`` of a page's text under one heading path (Markdown and HTML headings)."""

    start: int
    end: int
    heading_path: tuple[str, ...]


@dataclass(frozen=True)
class Page:
    number: int  # 1-based; formats without pages have a single page 1
    text: str
    sections: tuple[Section, ...] = ()  # empty: the whole page has no heading path
    # Spans [start, end) of ``text`` that are page furniture (running headers and footers, page numbers,
    # table-of-contents lines; ingest.furniture): kept in the text, so offsets hold, but never chunked.
    furniture: tuple[tuple[int, int], ...] = ()


@dataclass
class LoadedDocument:
    path: Path
    format: str
    pages: list[Page]
    warnings: list[str] = field(default_factory=list)
    # What the document calls itself: its first heading, PDF metadata title or HTML <title>, else the file
    # name made readable. Starts every chunk's context line (chunking.window_context).
    title: str = ""


# A title is cut to this many characters (at a word boundary): every chunk's context line repeats it.
TITLE_CHARS = 100


def readable_stem(path: Path) -> str:
    """The file name as a title: ``AMCOR_2023_10K.pdf`` -> ``AMCOR 2023 10K``, ``returns-and-warranty.txt`` ->
    ``returns and warranty`` (a hyphen next to a digit stays: ``KT-300``, ``2023-08-30``)."""
    words = re.sub(r"_+|(?<=[^\W\d_])-+(?=[^\W\d_])", " ", path.stem)
    return _short_title(words) or path.name


def first_line_title(text: str) -> str | None:
    """The first non-empty line of plain text when it reads as a title: short, and not a sentence."""
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not line or len(line) > 2 * TITLE_CHARS or len(line.split()) > 20 or line[-1] in ".,;:!?":
        return None
    return _short_title(line)


def _short_title(title: str) -> str:
    title = " ".join(title.split())
    if len(title) <= TITLE_CHARS:
        return title
    return title[:TITLE_CHARS].rsplit(" ", 1)[0]


def document_id_of(path: Path, *, block_size: int = 1 << 20) -> str:
    """Content hash of the file's path and bytes, read in blocks so a huge file is never held whole.

    The path is part of the hash so identical bytes under two names stay two documents: chunk ids derive
    from this id, and a citation must open the file it came from. Re-ingesting the same file gives the
    same id; a changed file gets a new one.
    """
    digest = hashlib.sha256()
    digest.update(str(path).encode("utf-8", "surrogateescape") + b"\0")
    with open(path, "rb") as handle:
        while block := handle.read(block_size):
            digest.update(block)
    return digest.hexdigest()[:32]


def detect_format(path: Path) -> str | None:
    """The loader name for ``path`` by extension, or None for unsupported files."""
    return EXTENSIONS.get(path.suffix.lower())


def load_document(path: Path, *, settings: IngestSettings) -> LoadedDocument:
    """Load ``path`` with the loader its extension names, after checking the content agrees.

    Raises:
        LoadError: unsupported, empty, too large, mislabeled, encrypted, corrupt, or without any text.
    """
    fmt = detect_format(path)
    if fmt is None:
        raise LoadError(f"{path}: unsupported file type {path.suffix or '(no extension)'!r}")
    size = path.stat().st_size
    if size == 0:
        raise LoadError(f"{path}: empty file (0 bytes)")
    if size > settings.max_file_bytes:
        raise LoadError(
            f"{path}: file is {size / 2**20:.1f} MiB, over the {settings.max_file_bytes / 2**20:.1f} MiB limit",
            hint="Split the file or raise ingest.max_file_bytes (LORAG_INGEST__MAX_FILE_BYTES)",
        )
    if fmt != "pdf" and size > 4 * settings.max_document_chars:  # UTF-8 needs at most 4 bytes a character
        raise LoadError(
            f"{path}: {size} bytes of text is over the limit of {settings.max_document_chars} characters",
            hint="Split the file or raise ingest.max_document_chars",
        )
    with open(path, "rb") as handle:
        head = handle.read(4096)
    _check_content_matches(path, fmt, head)
    document = LOADERS[fmt](path, settings=settings)
    total = sum(len(page.text) for page in document.pages)
    if total > settings.max_document_chars:
        raise LoadError(
            f"{path}: {total} characters of text, over the limit of {settings.max_document_chars}",
            hint="Split the file or raise ingest.max_document_chars",
        )
    if not any(page.text.strip() for page in document.pages):
        if fmt == "pdf":
            raise LoadError(f"{path}: PDF has no text layer (scanned or image-only?); OCR is not done")
        raise LoadError(f"{path}: no text found")
    return document


def _check_content_matches(path: Path, fmt: str, head: bytes) -> None:
    is_pdf = b"%PDF-" in head[:1024]
    if fmt == "pdf" and not is_pdf:
        looks_like = " (looks like HTML)" if re.search(rb"<(!doctype\s+html|html|head|body)\b", head, re.I) else ""
        raise LoadError(
            f"{path}: not a PDF{looks_like}: named .pdf but there is no %PDF- header",
            hint="Rename the file to its real type or export it as PDF again",
        )
    if fmt != "pdf" and is_pdf:
        raise LoadError(f"{path}: named {path.suffix} but the content is a PDF", hint="Rename it to .pdf")
    if fmt != "pdf" and b"\x00" in head:
        raise LoadError(f"{path}: binary content in a {path.suffix} file (NUL bytes)")


# ---------------------------------------------------------------- text formats


def _read_text(path: Path, warnings: list[str]) -> str:
    """Decode UTF-8 (BOM allowed); invalid bytes become U+FFFD with a warning rather than failing the file."""
    raw = path.read_bytes()  # bounded by ingest.max_file_bytes, checked before any loader runs
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        text = raw.decode("utf-8-sig", errors="replace")
        warnings.append(
            f"{path}: not valid UTF-8 (first bad byte at offset {error.start}); "
            f"{text.count(chr(0xFFFD))} bad bytes replaced with U+FFFD"
        )
    # Chunk spans index this exact string: normalise line endings once, here.
    return text.replace("\r\n", "\n").replace("\r", "\n")


def load_text(path: Path, *, settings: IngestSettings) -> LoadedDocument:
    warnings: list[str] = []
    text = _read_text(path, warnings)
    title = first_line_title(text) or readable_stem(path)
    return LoadedDocument(path, "text", [Page(1, text)], warnings, title)


_ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t#]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


def markdown_sections(text: str) -> tuple[Section, ...]:
    """Sections of Markdown ``text``, one per ATX heading, each carrying the path of headings above it.

    Text before the first heading is a section with an empty path. Headings inside fenced code are ignored.
    """
    sections: list[Section] = []
    stack: list[tuple[int, str]] = []  # (level, title) of the open headings
    start, path = 0, ()
    fence: str | None = None
    offset = 0
    for line in text.splitlines(keepends=True):
        stripped = line.rstrip("\n")
        fence_match = _FENCE.match(stripped)
        if fence_match:
            marker = fence_match.group(1)[0]
            fence = None if fence == marker else (fence or marker)
        elif fence is None and (heading := _ATX_HEADING.match(stripped)):
            if offset > start:
                sections.append(Section(start, offset, path))
            level = len(heading.group(1))
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, heading.group(2).strip()))
            start, path = offset, tuple(title for _, title in stack)
        offset += len(line)
    if len(text) > start:
        sections.append(Section(start, len(text), path))
    return tuple(sections)


def load_markdown(path: Path, *, settings: IngestSettings) -> LoadedDocument:
    warnings: list[str] = []
    text = _read_text(path, warnings)
    sections = markdown_sections(text)
    title = _first_heading(sections) or readable_stem(path)
    return LoadedDocument(path, "markdown", [Page(1, text, sections)], warnings, title)


def _first_heading(sections: tuple[Section, ...]) -> str | None:
    heading = next((section.heading_path[0] for section in sections if section.heading_path), None)
    return _short_title(heading) if heading else None


# Elements whose text is never content: code, styling, and page chrome repeated on every page of a site.
_BOILERPLATE = ("script", "style", "noscript", "template", "nav", "header", "footer", "svg", "iframe", "form")
_BLOCKS = frozenset(
    "address article aside blockquote body dd details dialog div dl dt fieldset figcaption figure h1 h2 h3 h4 "
    "h5 h6 hr li main ol p pre section summary table tbody td tfoot th thead title tr ul br".split()
)
_HEADINGS = {f"h{level}": level for level in range(1, 7)}


def load_html(path: Path, *, settings: IngestSettings) -> LoadedDocument:
    """Visible text only: boilerplate elements are dropped; h1-h6 become heading paths."""
    from bs4 import BeautifulSoup, NavigableString, Tag
    from bs4.element import PreformattedString

    warnings: list[str] = []
    soup = BeautifulSoup(_read_text(path, warnings), "html.parser")
    for element in soup.find_all(_BOILERPLATE):
        element.decompose()
    title_element = soup.find("title")
    document_title = _short_title(title_element.get_text(" ")) if title_element is not None else ""
    if soup.head is not None:
        title = soup.head.title
        if title is not None:
            title.extract()
            (soup.body or soup).insert(0, title)
        soup.head.decompose()

    text_parts: list[str] = []
    length = 0
    sections: list[Section] = []
    stack: list[tuple[int, str]] = []
    section_start, section_path = 0, ()
    last_block = None
    for node in soup.descendants:
        if isinstance(node, Tag) and node.name in _HEADINGS:
            level = _HEADINGS[node.name]
            title = " ".join(node.get_text(" ").split())
            if not title:
                continue
            start = length + (1 if text_parts else 0)  # the heading text starts after its line break
            if start > section_start:
                sections.append(Section(section_start, start, section_path))
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, title))
            section_start, section_path = start, tuple(t for _, t in stack)
        elif isinstance(node, NavigableString) and not isinstance(node, PreformattedString):
            words = " ".join(node.split())
            if not words:
                continue
            block = next((parent for parent in node.parents if parent.name in _BLOCKS), None)
            separator = "" if not text_parts else (" " if block is last_block else "\n")
            last_block = block
            text_parts.append(separator + words)
            length += len(separator) + len(words)
    text = "".join(text_parts)
    if length > section_start and (sections or section_path):
        sections.append(Section(section_start, length, section_path))
    sections = tuple(sections)
    title = document_title or _first_heading(sections) or readable_stem(path)
    return LoadedDocument(path, "html", [Page(1, text, sections)], warnings, title)


# ---------------------------------------------------------------- PDF


def load_pdf(path: Path, *, settings: IngestSettings) -> LoadedDocument:
    """One page per PDF page (1-based). Encrypted files open only if the empty password works.

    pypdf bounds decompression itself (LimitReachedError); the character limits bound what we keep. What pypdf
    logs while reading ("EOF marker not found") becomes this file's warnings, or part of its failure reason.
    """
    warnings: list[str] = []
    with _pypdf_warnings_into(warnings, path):
        try:
            return _load_pdf(path, settings=settings, warnings=warnings)
        except LoadError as error:
            # What pypdf said on the way ("EOF marker not found") is often the cause: part of the reason.
            notes = [w.split(": pypdf: ", 1)[1] for w in warnings if ": pypdf: " in w]
            if not notes:
                raise
            raise LoadError(f"{error} (pypdf: {'; '.join(dict.fromkeys(notes))})") from error


@contextmanager
def _pypdf_warnings_into(warnings: list[str], path: Path) -> Iterator[None]:
    """pypdf logs what it repairs ("incorrect startxref", ...) without naming the file: collect this thread's
    records into the document's warnings, each naming ``path``, instead of letting them reach the log bare."""
    thread = threading.get_ident()

    def capture(record: logging.LogRecord) -> bool:
        if record.thread != thread:
            return True
        if record.levelno >= logging.WARNING:
            warnings.append(f"{path}: pypdf: {record.getMessage()}")
        return False

    import pypdf  # noqa: F401 - imports its modules

    # A logger's filters see only the records made on it, and pypdf logs on one logger per module (its __name__):
    # each of them gets the filter.
    loggers = [logging.getLogger(name) for name in list(sys.modules) if name == "pypdf" or name.startswith("pypdf.")]
    for logger in loggers:
        logger.addFilter(capture)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(capture)


def _load_pdf(path: Path, *, settings: IngestSettings, warnings: list[str]) -> LoadedDocument:
    from pypdf import PdfReader
    from pypdf.errors import DependencyError, FileNotDecryptedError, LimitReachedError, PdfReadError

    try:
        reader = PdfReader(path, strict=False)
        if reader.is_encrypted:
            try:
                if not reader.decrypt(""):
                    raise LoadError(f"{path}: encrypted: a password is required",
                                    hint="Save a copy without a password and ingest that")
            except DependencyError as error:  # pypdf installed without its crypto extra
                raise LoadError(f"{path}: encrypted with AES, which needs the 'cryptography' package",
                                hint="pip install 'pypdf[crypto]'") from error
            except (FileNotDecryptedError, NotImplementedError) as error:
                raise LoadError(f"{path}: encrypted PDF cannot be opened ({error})") from error
        page_count = len(reader.pages)
        title = _pdf_title(reader) or readable_stem(path)
    except LoadError:
        raise
    except LimitReachedError as error:
        raise LoadError(f"{path}: PDF exceeds a safety limit while parsing ({error})") from error
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, OSError, RecursionError) as error:
        raise LoadError(f"{path}: corrupt or truncated PDF ({type(error).__name__}: {error})") from error
    if page_count == 0:
        raise LoadError(f"{path}: PDF has no pages")

    pages: list[Page] = []
    empty: list[int] = []
    total = 0
    for number in range(1, page_count + 1):
        try:
            text = reader.pages[number - 1].extract_text() or ""
        except LimitReachedError as error:
            raise LoadError(f"{path}: page {number} exceeds a safety limit while decompressing ({error})") from error
        except RecursionError as error:
            raise LoadError(f"{path}: page {number} is too deeply nested to parse") from error
        except Exception as error:  # pypdf raises many types on broken content streams; keep the other pages
            warnings.append(f"{path}: page {number} could not be read ({type(error).__name__}: {error}); skipped")
            text = ""
        if len(text) > settings.max_page_chars:
            raise LoadError(
                f"{path}: page {number} has {len(text)} characters of text, over the limit of "
                f"{settings.max_page_chars} (a decompression bomb or a malformed page?)",
                hint="Raise ingest.max_page_chars if the file is genuine",
            )
        total += len(text)
        if total > settings.max_document_chars:
            raise LoadError(
                f"{path}: more than {settings.max_document_chars} characters of text by page {number}",
                hint="Split the file or raise ingest.max_document_chars",
            )
        if not text.strip():
            empty.append(number)
        pages.append(Page(number, text))
    if empty and len(empty) < page_count:
        listed = ", ".join(map(str, empty[:10])) + (" ..." if len(empty) > 10 else "")
        warnings.append(
            f"{path}: {len(empty)} of {page_count} pages have no text layer (pages {listed}); OCR is not done"
        )
    furniture = find_furniture([page.text for page in pages])
    pages = [replace(page, furniture=spans) for page, spans in zip(pages, furniture)]
    return LoadedDocument(path, "pdf", pages, warnings, title)


def _pdf_title(reader) -> str | None:
    """The metadata title when it names the document: not an office file name ("Microsoft Word - draft3.docx")
    or a filing number ("0000004962-23-000006"), which many PDFs carry instead."""
    try:
        title = reader.metadata.title if reader.metadata is not None else None
    except Exception:  # a malformed /Info dictionary costs the title only
        return None
    title = " ".join(str(title or "").split())
    title = re.sub(r"^Microsoft (?:Word|PowerPoint|Excel) - ", "", title)
    if len(re.findall(r"[A-Za-z]{2,}", title)) < 2 or re.search(r"\.(?:docx?|pdf|indd|xlsx?|pptx?|rtf|odt)$", title, re.I):
        return None
    return _short_title(title)


LOADERS: dict[str, Callable[..., LoadedDocument]] = {
    "pdf": load_pdf,
    "markdown": load_markdown,
    "text": load_text,
    "html": load_html,
}
