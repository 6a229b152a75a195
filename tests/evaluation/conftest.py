"""Evaluation fixtures: the sample corpus ingested once for tenant 'acme' with a random-weight LoRA adapter
of the tiny Llama in its registry, and the real RetrievalService over it."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import SAMPLE_DOCS

ADAPTER = "support-v1"


@dataclass
class EvalCorpus:
    data_dir: Path
    retrieval: object  # RetrievalService
    adapter_dir: Path
    api_key: str


def make_adapter(model_path: Path, target: Path, *, tenant: str, seed: int = 1) -> Path:
    """A peft LoRA adapter with non-zero random weights (so it changes answers) in a registry dir."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from adapters.manifest import AdapterManifest, LoraSpec, model_fingerprint, write_adapter_dir, write_manifest

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))

    def fill(directory: Path) -> None:
        peft_model.save_pretrained(directory)
        (directory / "README.md").unlink(missing_ok=True)
        config = json.loads((directory / "adapter_config.json").read_text())
        (directory / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": str(model_path)}))
        write_manifest(directory, AdapterManifest(
            name=target.name, tenant=tenant, base_model=str(model_path), base_fingerprint=model_fingerprint(model.config),
            method="lora", lora=LoraSpec(rank=4, alpha=32, target_modules=["q_proj", "v_proj"]),
        ))

    return write_adapter_dir(target, fill)


@pytest.fixture(scope="session")
def eval_corpus(tmp_path_factory, tiny_llama_path) -> EvalCorpus:
    from ingest.pipeline import ingest_paths
    from retrieval.service import RetrievalService
    from core.datadir import adapters_dir
    from server.settings import ServerSettings
    from server.tenants import TenantRegistry

    data_dir = tmp_path_factory.mktemp("eval-data")
    settings = ServerSettings(data_dir=data_dir)
    retrieval = RetrievalService(settings)
    report = ingest_paths([SAMPLE_DOCS], tenant="acme", settings=settings, embedder=retrieval.embedder)
    assert report.failed == 0, report
    adapter_dir = make_adapter(tiny_llama_path, adapters_dir(data_dir, "acme") / ADAPTER, tenant="acme")
    _, key = TenantRegistry(data_dir).add("acme")
    return EvalCorpus(data_dir, retrieval, adapter_dir, key)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(one_torch_thread):
    """Every module here trains or runs tiny models."""
