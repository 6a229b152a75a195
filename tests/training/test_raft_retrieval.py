"""RAFT against a real index: sample documents ingested, passages retrieved, an adapter trained on them."""

import json

import pytest

from tests.conftest import SAMPLE_DOCS
from tests.training.conftest import train_settings, write_openai_jsonl
from training.raft import build_raft_examples

QA = [
    ("How often is conductivity calibration needed?", "Conductivity calibration is needed every 180 days."),
    ("How long is the warranty on a Kestrel Tide buoy?", "A three-year limited warranty."),
    ("When are firmware updates delivered?", "During the nightly check-in at 02:00 UTC."),
    ("Who pays the return shipping?", "The customer pays the return shipping unless the product arrived damaged."),
]


@pytest.mark.slow
def test_train_with_retrieval_on_an_ingested_tenant(tmp_path, data_dir, tiny_llama_path):
    from ingest.pipeline import ingest_paths
    from retrieval.service import RetrievalService
    from training.data import load_examples
    from training.recipe import train_adapter

    settings = train_settings(data_dir, tiny_llama_path, with_retrieval=True, k=3, raft_no_oracle_p=0.0,
                              max_steps=2, max_seq_len=1024)
    retrieval = RetrievalService(settings)
    report = ingest_paths([SAMPLE_DOCS / "policies", SAMPLE_DOCS / "handbook"], tenant="acme", settings=settings,
                          embedder=retrieval.embedder)
    assert report.failed == 0
    data = write_openai_jsonl(tmp_path / "qa.jsonl", QA)

    built = build_raft_examples(load_examples(data).examples, lambda q: retrieval.retrieve("acme", q, k=3),
                                settings=settings.training)
    first = built[0]
    oracle = first.passages[first.oracle_numbers[0] - 1]
    assert "every 180 days" in oracle.chunk.text and oracle.chunk.source.endswith("maintenance.md")
    assert first.messages[-1]["content"] == f"Conductivity calibration is needed every 180 days [{first.oracle_numbers[0]}]."

    result = train_adapter(settings, tenant="acme", data_file=data, name="raft", retrieval=retrieval)
    manifest = result.manifest
    assert manifest.data.with_retrieval and manifest.data.train == 4 and manifest.hyperparameters["k"] == 3
    assert len(result.losses) == 2
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["r"] == 16
