"""Web fixtures: a private data dir per module with tenants 'acme' (a few sample files) and 'beta' (one memo),
the real RetrievalService and extractive generator, and a small PDF writer for upload tests."""

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.ingest.pdf_pages import write_pdf  # noqa: F401 - the web tests' PDFs come from the one writer

from tests.conftest import SAMPLE_DOCS

BETA_TEXT = "Beta Corp internal memo.\n\nThe beta launch code is 7741 and the project name is Heron.\n"
ACME_FILES = ("specs/kestrel-tide-datasheet.pdf", "policies/returns-and-warranty.txt")


@dataclass
class Site:
    data_dir: Path
    retrieval: object  # RetrievalService
    acme_key: str
    beta_key: str


@pytest.fixture(scope="session")
def web_embedder():
    from retrieval.embedder import Embedder
    from core.settings import Settings

    return Embedder(Settings(data_dir="unused").embedding)


@pytest.fixture(scope="module")
def site(tmp_path_factory, web_embedder) -> Site:
    """Fresh per module: the tests upload and delete documents."""
    from ingest.pipeline import ingest_paths
    from retrieval.service import RetrievalService
    from server.settings import ServerSettings
    from server.tenants import TenantRegistry

    data_dir = tmp_path_factory.mktemp("web-data")
    settings = ServerSettings(data_dir=data_dir)
    acme_docs = tmp_path_factory.mktemp("acme-docs")
    for name in ACME_FILES:
        shutil.copy(SAMPLE_DOCS / name, acme_docs / Path(name).name)
    report = ingest_paths([acme_docs], tenant="acme", settings=settings, embedder=web_embedder)
    assert report.failed == 0, report.to_dict()
    beta_docs = tmp_path_factory.mktemp("beta-docs")
    (beta_docs / "memo.txt").write_text(BETA_TEXT)
    report = ingest_paths([beta_docs], tenant="beta", settings=settings, embedder=web_embedder)
    assert report.failed == 0, report.to_dict()

    registry = TenantRegistry(data_dir)
    _, acme_key = registry.add("acme")
    _, beta_key = registry.add("beta")
    return Site(data_dir, RetrievalService(settings, embedder=web_embedder), acme_key, beta_key)


@pytest.fixture(scope="module")
def extractive(site):
    from server.generation.factory import load_generator
    from server.settings import GenerationSettings

    generator = load_generator(GenerationSettings(model=None))
    assert generator.kind == "extractive"
    return generator


def site_settings(site: Site, **server):
    from server.settings import ServerSettings

    return ServerSettings(data_dir=site.data_dir, server=server)


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def artifacts(tmp_path) -> Path:
    """Where screenshots go: $LORAG_TEST_ARTIFACTS when set (kept for people to look at), else tmp_path."""
    root = os.environ.get("LORAG_TEST_ARTIFACTS")
    path = Path(root) / "web" if root else tmp_path
    path.mkdir(parents=True, exist_ok=True)
    return path


