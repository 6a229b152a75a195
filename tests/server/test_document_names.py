"""Documents are shown by their path relative to what was ingested: two files of one name in different
folders stay apart in listings, citations, prompts and filters, and no response carries a server path.
Indexes written before names were stored still read, their documents shown by file name."""

import sqlite3

import pytest

from tests.server.conftest import auth, server_settings


@pytest.fixture(scope="module")
def named(corpus, tmp_path_factory):
    """Tenants 'folders' (a folder with two pump.txt) and 'legacy' (the same, its index from before names)."""
    from core.datadir import index_dir
    from ingest.pipeline import ingest_paths
    from retrieval.index import STORE_NAME
    from server.tenants import TenantRegistry

    root = tmp_path_factory.mktemp("named-docs") / "plant"
    (root / "manuals").mkdir(parents=True)
    (root / "specs").mkdir()
    (root / "manuals" / "pump.txt").write_text("Pump manual.\n\nThe pump runs at 40 litres per minute when primed.\n")
    (root / "specs" / "pump.txt").write_text("Pump data sheet.\n\nThe pump weighs 12 kilograms without water.\n")
    settings = server_settings(corpus)
    keys = {}
    for tenant in ("folders", "legacy"):
        report = ingest_paths([root], tenant=tenant, settings=settings, embedder=corpus.retrieval.embedder)
        assert report.failed == 0, report
        keys[tenant] = TenantRegistry(corpus.data_dir).add(tenant)[1]
    with sqlite3.connect(index_dir(corpus.data_dir, "legacy") / STORE_NAME) as connection:
        connection.execute("ALTER TABLE documents DROP COLUMN name")  # the schema before names
    return root, keys


@pytest.fixture(scope="module")
def client(corpus, extractive_generator, named):
    from fastapi.testclient import TestClient

    from server.app import create_app

    with TestClient(create_app(server_settings(corpus), retrieval=corpus.retrieval,
                               generator=extractive_generator)) as test_client:
        yield test_client


def test_sources_are_relative_to_what_was_ingested(client, named):
    root, keys = named
    headers = auth(keys["folders"])
    documents = client.get("/v1/documents", headers=headers)
    assert {d["source"] for d in documents.json()["data"]} == {"manuals/pump.txt", "specs/pump.txt"}
    answer = client.post("/v1/chat/completions", headers=headers, json={
        "model": "lorag", "messages": [{"role": "user", "content": "How much does the pump weigh?"}]})
    citations = answer.json()["citations"]
    weight = [c for c in citations if "12 kilograms" in c["text"]]
    assert weight and all(c["source"] == "specs/pump.txt" for c in weight)
    assert all(c["source"] == "manuals/pump.txt" for c in citations if "40 litres" in c["text"])
    only = client.post("/v1/retrieve", headers=headers, json={"query": "pump", "sources": ["manuals/pump.txt"]})
    assert {p["source"] for p in only.json()["data"]} == {"manuals/pump.txt"}
    both = client.post("/v1/retrieve", headers=headers, json={"query": "pump", "sources": ["pump.txt"]})
    assert {p["source"] for p in both.json()["data"]} == {"manuals/pump.txt", "specs/pump.txt"}
    for response in (documents, answer, only, both):
        assert str(root) not in response.text and str(root.parent) not in response.text


def test_the_prompt_names_documents_as_clients_see_them(corpus, named):
    from core.prompt import build_prompt

    passages = corpus.retrieval.retrieve("folders", "How much does the pump weigh?")
    prompt = build_prompt([{"role": "user", "content": "How much does the pump weigh?"}], passages)
    assert 'source="specs/pump.txt"' in prompt.messages[-1]["content"]
    assert str(named[0]) not in prompt.messages[-1]["content"]


def test_an_index_from_before_names_shows_file_names(client, named):
    headers = auth(named[1]["legacy"])
    documents = client.get("/v1/documents", headers=headers).json()["data"]
    assert sorted(d["source"] for d in documents) == ["pump.txt", "pump.txt"]
    passages = client.post("/v1/retrieve", headers=headers, json={"query": "pump weight"}).json()["data"]
    assert passages and {p["source"] for p in passages} == {"pump.txt"}
