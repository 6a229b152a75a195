"""vLLM's runtime LoRA API on a real uvicorn server with the tiny Llama: load_lora_adapter and
unload_lora_adapter with vLLM's status codes and messages; an HF Trainer output dir loads as it is saved;
a runtime-loaded adapter is kept across a restart, as documented."""

import shutil

import pytest

from tests.adapters.conftest import install, make_adapter
from tests.adapters.test_serving import adapter_server, api, ask, listed
from tests.adapters.test_trainer_dirs import trainer_dir

pytestmark = pytest.mark.slow


def _models(url, key) -> set[str]:
    return {card["id"] for card in api(url, key, "GET", "/v1/models").json()["data"]}


def _load(url, key, name, path, **extra):
    return api(url, key, "POST", "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path), **extra})


def test_load_replace_unload_and_restart_follow_vllm(data_dir, tiny_llama_path, adapter_sources, retrieval_service,
                                                     tmp_path):
    allowed = tmp_path / "allowed"
    for name in ("alpha", "bravo"):
        shutil.copytree(adapter_sources[name], allowed / name)
    install(adapter_sources["charlie"], data_dir, "acme", "trained")  # as `lorag train` lands one
    with adapter_server(data_dir, tiny_llama_path, retrieval_service, allowed_paths=[str(allowed)]) as (url, keys, _):
        key = keys["acme"]
        base = ask(url, key, "base")
        loaded = _load(url, key, "runtime", allowed / "alpha")
        assert loaded.status_code == 200 and loaded.text == "Success: LoRA adapter 'runtime' added successfully."
        assert "runtime" in _models(url, key)
        listing = api(url, key, "GET", "/v1/adapters")
        assert listing.json()["data"] and str(tiny_llama_path) not in listing.text  # no server path for tenants
        alpha = ask(url, key, "runtime")
        assert alpha != base

        again = _load(url, key, "runtime", allowed / "bravo")
        assert again.status_code == 400, again.text
        assert again.json()["error"]["message"].startswith("The lora adapter 'runtime' has already been loaded.")
        assert ask(url, key, "runtime") == alpha  # unchanged

        inplace = _load(url, key, "runtime", allowed / "bravo", load_inplace=True)
        assert inplace.status_code == 200, inplace.text
        bravo = ask(url, key, "runtime")
        assert bravo not in (alpha, base)

        unloaded = api(url, key, "POST", "/v1/unload_lora_adapter", json={"lora_name": "runtime"})
        assert unloaded.status_code == 200 and unloaded.text == "Success: LoRA adapter 'runtime' removed successfully."
        assert "runtime" not in _models(url, key) and "runtime" not in listed(url, key)
        refused = api(url, key, "POST", "/v1/chat/completions",
                      json={"model": "runtime", "messages": [{"role": "user", "content": "hi"}]})
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"
        gone = api(url, key, "POST", "/v1/unload_lora_adapter", json={"lora_name": "runtime"})
        assert gone.status_code == 404 and gone.json()["error"]["message"] == "The lora adapter 'runtime' cannot be found."
        assert (allowed / "bravo" / "adapter_model.safetensors").is_file()  # the loaded-from dir is never touched

        # an adapter lorag trained is not the runtime API's to remove
        kept = api(url, key, "POST", "/v1/unload_lora_adapter", json={"lora_name": "trained"})
        assert kept.status_code == 409 and "DELETE /v1/adapters/trained" in kept.json()["error"]["message"]
        assert "trained" in _models(url, key)

        assert _load(url, key, "survivor", allowed / "alpha").status_code == 200
    with adapter_server(data_dir, tiny_llama_path, retrieval_service, allowed_paths=[str(allowed)]) as (url, keys, _):
        # documented: runtime-loaded adapters live in the tenant's registry, so a restart keeps them
        assert {"survivor", "trained"} <= _models(url, keys["acme"]) and "runtime" not in _models(url, keys["acme"])
        assert ask(url, keys["acme"], "survivor") == alpha


def test_a_trainer_output_dir_loads_as_saved(data_dir, tiny_llama_path, retrieval_service, tmp_path):
    allowed = tmp_path / "allowed"
    plain = make_adapter(tiny_llama_path, tmp_path / "plain", seed=21, manifest=False)
    tripwire = tmp_path / "unpickled"
    trainer_dir(plain, allowed / "llama-factory-out", tripwire, tiny_llama_path)
    only_pickles = shutil.copytree(allowed / "llama-factory-out", allowed / "pickled")
    (only_pickles / "adapter_model.safetensors").rename(only_pickles / "adapter_model.bin")
    with adapter_server(data_dir, tiny_llama_path, retrieval_service, allowed_paths=[str(allowed)]) as (url, keys, _):
        key = keys["acme"]
        loaded = _load(url, key, "factory", allowed / "llama-factory-out")
        assert loaded.status_code == 200, loaded.text
        assert ask(url, key, "factory") != ask(url, key, "base")
        copied = {p.name for p in (data_dir / "tenants" / "acme" / "adapters" / "factory").iterdir()}
        assert "training_args.bin" not in copied and "adapter_model.safetensors" in copied
        refused = _load(url, key, "pickled", only_pickles)
        assert refused.status_code == 422 and "adapter_model.bin" in refused.json()["error"]["message"]
    assert not tripwire.exists()
