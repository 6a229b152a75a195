import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from langchain_core.documents import Document

from core.errors import NotFound
from retrieval.langchain import LoragRetriever
from retrieval.service import NoIndex, RetrievalService, UnknownSources
from core.settings import Settings, load_settings
from lorag.cli import main
from tests.retrieval.conftest import CORPUS, make_document


@pytest.fixture
def service(data_dir, embedder) -> RetrievalService:
    return RetrievalService(load_settings(Settings, data_dir=data_dir), embedder=embedder)


def test_service_retrieves_per_tenant(build_index, service):
    build_index(["handbook/calibration.md"], tenant="acme")
    build_index(["recipes/bread.txt", "travel/norway.txt"], tenant="globex")

    acme = service.retrieve("acme", "which part replaces the probe?", k=2)
    assert acme[0].chunk.text == CORPUS["handbook/calibration.md"][1][1]
    globex = service.retrieve("globex", "which part replaces the probe QX-7731B?", k=10)
    assert len(globex) == 4 and all(p.chunk.tenant == "globex" for p in globex)
    assert service.retrieve("nobody", "anything") == []
    assert service.documents("nobody") == []
    assert service.retrieve("globex", "bread", mode="keyword", sources=["travel/norway.txt"]) == []


def test_service_lookups_and_not_found(build_index, service):
    index = build_index(["handbook/warranty.md"])
    record = index.documents()[0]
    chunks = index.chunks_of(record.document_id)
    assert service.documents("acme") == [record] and service.document("acme", record.document_id) == record
    assert service.chunks_of("acme", record.document_id) == chunks
    assert service.chunk("acme", chunks[0].id) == chunks[0]
    assert service.neighbours("acme", chunks[0].id, after=2) == chunks
    for call in (lambda: service.chunk("acme", "nope"), lambda: service.document("acme", "nope"),
                 lambda: service.chunks_of("acme", "nope"), lambda: service.neighbours("acme", "nope"),
                 lambda: service.chunk("nobody", chunks[0].id), lambda: service.chunk("globex", chunks[0].id)):
        with pytest.raises(NotFound, match="not found for tenant"):
            call()


def test_service_sees_commits_made_elsewhere(build_index, service, corpus_vectors):
    index = build_index(["recipes/bread.txt"])
    assert service.retrieve("acme", "Hardanger", mode="keyword") == []
    with index.update() as update:
        record, chunks = make_document("acme", "travel/norway.txt", *CORPUS["travel/norway.txt"])
        update.put_document(record, chunks, corpus_vectors["travel/norway.txt"])
        update.commit()
    assert service.retrieve("acme", "Hardanger", mode="keyword")[0].chunk == chunks[1]


def test_concurrent_requests_get_the_same_answers_as_sequential_ones(build_index, service):
    build_index()
    queries = ["warranty claim", "calibrate the probe", "bake sourdough", "trains to Bergen", "QX-7731B"] * 4
    expected = [service.retrieve("acme", q, k=3) for q in queries]
    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(lambda q: service.retrieve("acme", q, k=3), queries)) == expected


def test_langchain_retriever_returns_documents_with_citation_metadata(build_index, service):
    build_index()
    retriever = LoragRetriever(service=service, tenant="acme", k=2)
    documents = retriever.invoke("which part number replaces a drifting probe?")
    assert len(documents) == 2 and all(isinstance(d, Document) for d in documents)
    top = documents[0]
    assert top.page_content == CORPUS["handbook/calibration.md"][1][1]
    assert top.metadata["source"] == "handbook/calibration.md" and top.metadata["page"] == 1
    assert top.metadata["end"] - top.metadata["start"] == len(top.page_content)
    assert top.metadata["heading_path"] == ["Calibration"] and top.metadata["score"] > 0
    assert LoragRetriever(service=service, tenant="acme", mode="keyword", k=5).invoke("sourdough")[0].metadata[
        "source"] == "recipes/bread.txt"


def test_langchain_retriever_refuses_an_unknown_tenant_an_empty_index_and_an_unmatched_filter(build_index, service):
    with pytest.raises(NoIndex, match="tenant 'nobody' has no indexed documents"):
        LoragRetriever(service=service, tenant="nobody").invoke("anything")
    index = build_index(["handbook/warranty.md"], tenant="emptied")
    with index.update() as update:
        update.remove_source("handbook/warranty.md")
        update.commit()
    with pytest.raises(NoIndex, match="tenant 'emptied' has no indexed documents"):
        LoragRetriever(service=service, tenant="emptied").invoke("warranty")
    build_index(["handbook/warranty.md"], tenant="acme")
    with pytest.raises(UnknownSources, match=r"sources \['handbook/nope.md'\] match no document of tenant 'acme'"):
        LoragRetriever(service=service, tenant="acme", sources=["handbook/nope.md"]).invoke("warranty")
    # Before, an unmatched filter became no filter: passages from every document came back.
    with pytest.raises(UnknownSources):
        service.retrieve("acme", "warranty", sources=["handbook/nope.md"])
    assert LoragRetriever(service=service, tenant="acme", sources=["warranty.md"]).invoke("warranty")


def test_search_cli_prints_passages_and_json(build_index, data_dir, capsys):
    build_index()
    assert main(["search", "how long is the warranty?", "--tenant", "acme", "-k", "2", "--data-dir", str(data_dir)]) == 0
    text = capsys.readouterr().out
    assert "[1] handbook/warranty.md  page " in text and "two-year warranty" in text and "score" in text

    argv = ["search", "QX-7731B", "--tenant", "acme", "-k", "3", "--mode", "keyword", "--json",
            "--source", "handbook/calibration.md", "--data-dir", str(data_dir)]
    assert main(argv) == 0
    passages = json.loads(capsys.readouterr().out)
    assert len(passages) == 1
    assert {"id", "source", "page", "start", "end", "score", "text", "heading_path"} <= set(passages[0])
    assert passages[0]["source"] == "handbook/calibration.md" and passages[0]["page"] == 1
    assert passages[0]["text"] == CORPUS["handbook/calibration.md"][1][1] and passages[0]["score"] > 0


def test_search_cli_names_an_unknown_source(build_index, data_dir, capsys):
    build_index()
    argv = ["search", "warranty", "--tenant", "acme", "--source", "handbook/nope.md", "--data-dir", str(data_dir)]
    assert main(argv) == 2
    assert "tenant 'acme' has no document from 'handbook/nope.md'" in capsys.readouterr().err


def test_search_cli_without_index_exits_2(data_dir, capsys):
    assert main(["search", "anything", "--tenant", "empty", "--data-dir", str(data_dir)]) == 2
    error = capsys.readouterr().err
    assert "tenant 'empty' has no index" in error and "lorag ingest" in error
