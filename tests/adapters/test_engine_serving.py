"""The multi-adapter engine behind a real uvicorn server (generation.engine = "engine", built by create_app),
through the openai client: every answer equals the transformers + peft server's, hot add / delete, DoRA refused,
eviction with one device slot."""

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

from tests.adapters.conftest import install
from tests.adapters.test_serving import ADMIN_KEY, api, ask, finish, listed, open_stream, tar_of, wait_until

pytestmark = pytest.mark.slow

TENANTS = ("acme", "beta", "gamma")


@contextmanager
def model_server(data_dir, model_path, retrieval, *, engine: str, **adapters):
    """create_app loading the model itself per ``engine``; yields (base_url, keys, generator)."""
    from server.app import create_app
    from server.background import serving
    from server.settings import ServerSettings
    from server.tenants import TenantRegistry

    registry = TenantRegistry(data_dir)
    keys = {tenant: registry.add(tenant)[1] for tenant in TENANTS}
    settings = ServerSettings(
        data_dir=data_dir, server={"admin_key": ADMIN_KEY},
        generation={"model": str(model_path), "device": "cpu", "engine": engine, "fallback": "error",
                    "max_batch_size": 8, "max_context_tokens": 512},
        adapters={"poll_interval_s": 0.2, **adapters},
    )
    app = create_app(settings, retrieval=retrieval)
    with serving(app) as base_url:
        yield base_url, keys, app.state.services.generator


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama_path, adapter_sources, retrieval_service):
    """Greedy answers of the transformers + peft server: {adapter source name or "base": answer}."""
    from server.generation.transformers_generator import TransformersGenerator

    data_dir = tmp_path_factory.mktemp("reference-data")
    for name, source in adapter_sources.items():
        install(source, data_dir, "acme", name)
    with model_server(data_dir, tiny_llama_path, retrieval_service, engine="transformers") as (url, keys, generator):
        assert isinstance(generator, TransformersGenerator)
        answers = {name: ask(url, keys["acme"], name, max_tokens=32) for name in [*adapter_sources, "base"]}
    assert len(set(answers.values())) == len(answers)  # every adapter visibly changes the answer
    return answers


def test_engine_answers_each_tenant_with_its_own_adapter_concurrently(
    data_dir, tiny_llama_path, adapter_sources, retrieval_service, reference
):
    from server.generation.engine_generator import EngineGenerator

    install(adapter_sources["alpha"], data_dir, "acme", "alpha")
    install(adapter_sources["bravo"], data_dir, "beta", "bravo")
    with model_server(data_dir, tiny_llama_path, retrieval_service, engine="engine") as (url, keys, generator):
        assert isinstance(generator, EngineGenerator)
        jobs = [("acme", "alpha"), ("beta", "bravo"), ("acme", "base"), ("gamma", "base")] * 3
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            answers = list(pool.map(lambda job: ask(url, keys[job[0]], job[1], max_tokens=32), jobs))
        assert answers == [reference[name] for _, name in jobs]
        assert len(generator.resident_keys()) == 2  # the registry put both versions into engine slots
        assert listed(url, keys["acme"])["alpha"]["residency"] == "gpu"
        assert listed(url, keys["beta"])["bravo"]["requests"] == 3


def test_hot_add_delete_and_dora_refusal_through_the_api(
    data_dir, tiny_llama_path, adapter_sources, retrieval_service, reference, tmp_path
):
    install(adapter_sources["alpha"], data_dir, "acme", "alpha")
    with model_server(data_dir, tiny_llama_path, retrieval_service, engine="engine") as (url, keys, generator):
        assert ask(url, keys["acme"], "alpha", max_tokens=32) == reference["alpha"]

        # Upload while an answer streams on alpha; the new adapter answers as under transformers + peft.
        first, chunks = open_stream(url, keys["acme"], "alpha", max_tokens=32)
        added = api(url, keys["beta"], "POST", "/v1/adapters", data={"name": "fresh"},
                    files={"file": ("charlie.tar.gz", tar_of(adapter_sources["charlie"]), "application/gzip")})
        assert added.status_code == 201, added.text
        assert ask(url, keys["beta"], "fresh", max_tokens=32) == reference["charlie"]
        assert finish(first, chunks) == reference["alpha"]

        # Hot add on disk, as `lorag train` lands an adapter: discovered without restart.
        install(adapter_sources["delta"], data_dir, "gamma", "delta")
        wait_until(lambda: "delta" in listed(url, keys["gamma"]))
        assert ask(url, keys["gamma"], "delta", max_tokens=32) == reference["delta"]

        # Delete while streaming: the answer completes on its version, then its slot is freed.
        first, chunks = open_stream(url, keys["acme"], "alpha", max_tokens=32)
        key = next(k for k in generator.resident_keys() if k.startswith("acme:alpha@"))
        assert api(url, keys["acme"], "DELETE", "/v1/adapters/alpha").json()["deleted"] is True
        assert finish(first, chunks) == reference["alpha"]
        wait_until(lambda: key not in generator.resident_keys())
        assert api(url, keys["acme"], "GET", "/v1/adapters/alpha").status_code == 404

        # DoRA: the engine runs plain LoRA only, so the upload is refused with the reason and the way out.
        dora = tmp_path / "dora"
        build_dora(tiny_llama_path, dora)
        refused = api(url, keys["acme"], "POST", "/v1/adapters", data={"name": "dora"},
                      files={"file": ("dora.tar.gz", tar_of(dora), "application/gzip")})
        assert refused.status_code == 409, refused.text
        message = refused.json()["error"]["message"]
        assert "DoRA" in message and 'generation.engine = "transformers"' in message
        assert "dora" not in listed(url, keys["acme"])
        assert ask(url, keys["acme"], "base", max_tokens=32) == reference["base"]


def test_one_device_slot_evicts_lru_and_answers_stay_exact(
    data_dir, tiny_llama_path, adapter_sources, retrieval_service, reference
):
    tenants = {"acme": "alpha", "beta": "bravo", "gamma": "charlie"}
    for tenant, name in tenants.items():
        install(adapter_sources[name], data_dir, tenant, name)
    with model_server(data_dir, tiny_llama_path, retrieval_service, engine="engine", max_resident=1,
                      max_host=1) as (url, keys, generator):
        for tenant, name in tenants.items():
            assert ask(url, keys[tenant], name, max_tokens=32) == reference[name]
            assert len(generator.resident_keys()) == 1

        errors = []

        def hammer(tenant):
            for _ in range(3):
                if ask(url, keys[tenant], tenants[tenant], max_tokens=32) != reference[tenants[tenant]]:
                    errors.append(tenant)

        threads = [threading.Thread(target=hammer, args=(t,)) for t in tenants]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert len(generator.resident_keys()) == 1
        residencies = [listed(url, keys[t])[n]["residency"] for t, n in tenants.items()]
        assert residencies.count("gpu") == 1


def build_dora(model_path, out) -> None:
    """A real peft DoRA adapter of the tiny Llama, as a plain peft dir naming the served model."""
    import json

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(5)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": str(model_path)}))
