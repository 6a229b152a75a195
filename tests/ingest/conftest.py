"""Fixtures shared by the ingest tests: one embedder per session, and settings pointing at a test data dir."""

from pathlib import Path

import pytest

from ingest.settings import IngestAppSettings, IngestSettings


@pytest.fixture(scope="session")
def embedder():
    from retrieval.embedder import Embedder
    from core.settings import EmbeddingSettings

    return Embedder(EmbeddingSettings())


def make_settings(data_dir: Path, **ingest) -> IngestAppSettings:
    return IngestAppSettings(data_dir=data_dir, ingest=IngestSettings(**ingest))
