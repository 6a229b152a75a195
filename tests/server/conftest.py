"""Server fixtures: the sample corpus ingested once for tenant 'acme', a one-file corpus for 'beta',
the real RetrievalService and the extractive generator, shared by every route test module."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import SAMPLE_DOCS

ADMIN_KEY = "admin-" + "k" * 30
BETA_TEXT = "Beta Corp internal memo.\n\nThe beta launch code is 7741 and the project name is Heron.\n"


@dataclass
class Corpus:
    data_dir: Path
    retrieval: object  # RetrievalService
    acme_key: str
    beta_key: str
    admin_key: str


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Corpus:
    from ingest.pipeline import ingest_paths
    from retrieval.service import RetrievalService
    from server.settings import ServerSettings
    from server.tenants import TenantRegistry

    data_dir = tmp_path_factory.mktemp("server-data")
    settings = ServerSettings(data_dir=data_dir)
    retrieval = RetrievalService(settings)
    report = ingest_paths([SAMPLE_DOCS], tenant="acme", settings=settings, embedder=retrieval.embedder)
    assert report.failed == 0, report
    beta_dir = tmp_path_factory.mktemp("beta-docs")
    (beta_dir / "memo.txt").write_text(BETA_TEXT)
    report = ingest_paths([beta_dir], tenant="beta", settings=settings, embedder=retrieval.embedder)
    assert report.failed == 0, report

    registry = TenantRegistry(data_dir)
    _, acme_key = registry.add("acme")
    _, beta_key = registry.add("beta")
    return Corpus(data_dir, retrieval, acme_key, beta_key, admin_key=ADMIN_KEY)


@pytest.fixture(scope="session")
def extractive_generator():
    from server.generation.factory import load_generator
    from server.settings import GenerationSettings

    generator = load_generator(GenerationSettings(model=None))
    assert generator.kind == "extractive"
    return generator


def server_settings(corpus: Corpus, **server):
    from server.settings import ServerSettings

    return ServerSettings(data_dir=corpus.data_dir, server={"admin_key": corpus.admin_key, **server})


@pytest.fixture(scope="module")
def client(corpus, extractive_generator):
    from fastapi.testclient import TestClient

    from server.app import create_app

    app = create_app(server_settings(corpus), retrieval=corpus.retrieval, generator=extractive_generator)
    with TestClient(app) as test_client:
        yield test_client


def auth(key: str, **headers) -> dict:
    return {"Authorization": f"Bearer {key}", **headers}


def assert_error(response, status: int, *, error_type: str | None = None, param: str | None = None) -> dict:
    """The response is one OpenAI error object with ``status``; returns the error."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["message"]
    if error_type is not None:
        assert error["type"] == error_type, error
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.fixture(scope="session")
def endless_llama_path(tiny_llama_path, tmp_path_factory):
    """The tiny Llama with its end-of-turn row of lm_head zeroed: that logit is exactly 0 while the other 511
    are random, so greedy decoding never ends a turn and the disconnect tests always outlast the client."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.convert_tokens_to_ids("<|im_end|>")] = 0.0
    path = tmp_path_factory.mktemp("endless-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
