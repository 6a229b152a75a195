"""Adapter fixtures: real peft LoRA adapters of the tiny Llama (random non-zero weights, fixed seeds, so each
changes greedy output visibly), written with the training side's atomic adapter-dir writer and manifest."""

import json
from pathlib import Path

import pytest

from core.datadir import adapters_dir


def make_adapter(
    model_path: Path,
    target: Path,
    *,
    seed: int,
    tenant: str = "acme",
    rank: int = 4,
    targets=("q_proj", "v_proj"),
    manifest: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a LoRA adapter for ``model_path`` into ``target`` (a registry dir or any dir)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from adapters.manifest import AdapterManifest, LoraSpec, model_fingerprint, write_adapter_dir, write_manifest

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    lora = LoraConfig(r=rank, lora_alpha=64, target_modules=list(targets), init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    fingerprint = model_fingerprint(AutoConfig.from_pretrained(model_path))

    def fill(directory: Path) -> None:
        peft_model.save_pretrained(directory)
        (directory / "README.md").unlink(missing_ok=True)
        config = json.loads((directory / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(model_path)
        (directory / "adapter_config.json").write_text(json.dumps(config))
        if manifest:
            write_manifest(directory, AdapterManifest(
                name=Path(target).name, tenant=tenant, base_model=str(model_path), base_fingerprint=fingerprint,
                method="lora", lora=LoraSpec(rank=rank, alpha=64, target_modules=list(targets)),
                metrics={"steps": 3, "train_loss": 1.5},
            ))

    if manifest:
        return write_adapter_dir(target, fill, overwrite=overwrite)
    Path(target).mkdir(parents=True, exist_ok=overwrite)
    fill(Path(target))
    return Path(target)


def registry_dir(data_dir: Path, tenant: str, name: str) -> Path:
    return adapters_dir(data_dir, tenant) / name


@pytest.fixture(scope="session")
def adapter_sources(tmp_path_factory, tiny_llama_path) -> dict[str, Path]:
    """Ready-made adapter dirs outside any registry, copied into each test's data dir as needed."""
    root = tmp_path_factory.mktemp("adapter-sources")
    return {
        name: make_adapter(tiny_llama_path, root / name, seed=seed)
        for name, seed in (("alpha", 1), ("bravo", 2), ("charlie", 3), ("delta", 4))
    }


def install(source: Path, data_dir: Path, tenant: str, name: str) -> Path:
    """Copy a ready adapter into a tenant's registry the way `lorag train` lands one (atomic rename)."""
    import shutil

    from adapters.manifest import write_adapter_dir

    def fill(directory: Path) -> None:
        for item in source.iterdir():
            shutil.copyfile(item, directory / item.name)
        manifest = json.loads((directory / "lorag_adapter.json").read_text())
        (directory / "lorag_adapter.json").write_text(json.dumps(manifest | {"tenant": tenant, "name": name}))

    return write_adapter_dir(registry_dir(data_dir, tenant, name), fill, overwrite=True)


@pytest.fixture(scope="session")
def retrieval_service(tmp_path_factory):
    from retrieval.service import RetrievalService
    from server.settings import ServerSettings

    return RetrievalService(ServerSettings(data_dir=tmp_path_factory.mktemp("adapter-retrieval")))
