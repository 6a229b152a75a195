"""The cited sources as a short Markdown list appended to an answer's text, for clients that show only
``content`` (Open WebUI, LangChain's message text): number, document name, page and a link to the passage."""

from collections.abc import Sequence

from server.schemas import CitationOut

SOURCES_HEADING = "**Sources**"


def sources_markdown(citations: Sequence[CitationOut], *, base_url: str | None = None) -> str:
    """``"\\n\\n**Sources**\\n- **[1]** [name, page 2](url)..."``; empty when nothing is cited.

    A bullet list, not a numbered one: Markdown renumbers ordered lists from their first number, and the
    cited numbers need not be consecutive ([1] and [3]).
    """
    if not citations:
        return ""
    prefix = (base_url or "").rstrip("/")
    lines = ["", "", SOURCES_HEADING, ""]
    for citation in citations:
        label = _escape(f"{citation.source}, page {citation.page}")
        lines.append(f"- **[{citation.number}]** [{label}]({prefix}{citation.url})")
    return "\n".join(lines)


def _escape(text: str) -> str:
    # A bracket or backslash in a file name would end the link text early.
    return "".join("\\" + ch if ch in "\\[]" else ch for ch in text)
