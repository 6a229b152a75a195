"""The ``ingest`` settings section: size limits that keep bad or hostile files bounded, and commit sizes.

``lorag ingest`` (:class:`IngestAppSettings`) and the server (``ServerSettings``) carry this section;
:func:`ingest_settings_of` gives the defaults to callers holding only the shared ``Settings``.
"""

from pydantic import BaseModel, Field

from core.settings import Settings


class IngestSettings(BaseModel):
    max_file_bytes: int = Field(256 * 2**20, ge=1, description="larger files are refused with a clear message")
    max_page_chars: int = Field(1_000_000, ge=1, description="text extracted from one PDF page")
    max_document_chars: int = Field(20_000_000, ge=1, description="text extracted from one file")
    commit_every_chunks: int = Field(
        20_000, ge=1, description="commit after this many new chunks, bounding the memory held by pending vectors"
    )
    prefetch_files: int = Field(2, ge=0, description="files parsed and chunked ahead while the embedder runs")


class IngestAppSettings(Settings):
    """Settings with the ``ingest`` section, for the ``lorag ingest`` command."""

    ingest: IngestSettings = IngestSettings()


def ingest_settings_of(settings: Settings) -> IngestSettings:
    """The ``ingest`` section of ``settings``, or the defaults when its class has none."""
    return getattr(settings, "ingest", None) or IngestSettings()
