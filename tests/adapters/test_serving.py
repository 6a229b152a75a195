"""Adapters in a real uvicorn server with the tiny Llama, through the openai client: per-tenant outputs in mixed
batches, hot add / replace / delete while answers stream, eviction with one device slot, tenant isolation."""

import io
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest

from tests.adapters.conftest import install

pytestmark = pytest.mark.slow

ADMIN_KEY = "admin-" + "k" * 30
QUESTION = "hello there"


@contextmanager
def adapter_server(data_dir, model_path, retrieval, **adapters):
    """A served app on a free port with its own TransformersGenerator; yields (base_url, keys, generator)."""
    import asyncio

    from server.app import create_app
    from server.background import serving
    from server.settings import ServerSettings
    from server.tenants import TenantRegistry
    from server.generation.transformers_generator import TransformersGenerator

    registry = TenantRegistry(data_dir)
    known = {tenant.id for tenant in registry.tenants()}  # a restart on the same data dir: new keys, same tenants
    keys = {tenant: registry.rotate_key(tenant) if tenant in known else registry.add(tenant)[1]
            for tenant in ("acme", "beta", "gamma")}
    settings = ServerSettings(
        data_dir=data_dir, server={"admin_key": ADMIN_KEY},
        generation={"model": str(model_path), "fallback": "error", "max_batch_size": 8},
        adapters={"poll_interval_s": 0.2, **adapters},
    )
    generator = TransformersGenerator.from_pretrained(str(model_path), device="cpu")
    try:
        with serving(create_app(settings, retrieval=retrieval, generator=generator)) as base_url:
            yield base_url, keys, generator
    finally:
        asyncio.run(generator.close())


def ask(base_url, key, model, *, max_tokens=16) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0)
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=max_tokens, temperature=0,
        extra_body={"retrieval": {"enabled": False}},
    )
    return response.choices[0].message.content


def open_stream(base_url, key, model, *, max_tokens=48):
    """A streaming answer with its first content chunk already received; iterate for the rest."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0)
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=max_tokens, temperature=0,
        stream=True, extra_body={"retrieval": {"enabled": False}},
    )
    chunks = iter(stream)
    first = ""
    while not first:
        chunk = next(chunks)
        first = (chunk.choices[0].delta.content or "") if chunk.choices else ""
    return first, chunks


def finish(first, chunks) -> str:
    return first + "".join((c.choices[0].delta.content or "") for c in chunks if c.choices)


def api(base_url, key, method, path, **kwargs):
    return httpx.request(method, f"{base_url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=60, **kwargs)


def listed(base_url, key) -> dict:
    body = api(base_url, key, "GET", "/v1/adapters").json()
    assert body["object"] == "list"
    return {a["name"]: a for a in body["data"]}


def tar_of(directory) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(directory, arcname=directory.name)
    return buffer.getvalue()


def wait_until(condition, *, timeout=30.0):
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_mixed_tenant_batches_give_each_row_its_own_adapter_and_tenants_stay_apart(
    data_dir, tiny_llama_path, adapter_sources, retrieval_service
):
    install(adapter_sources["alpha"], data_dir, "acme", "alpha")
    install(adapter_sources["bravo"], data_dir, "beta", "bravo")
    with adapter_server(data_dir, tiny_llama_path, retrieval_service) as (url, keys, generator):
        jobs = [("acme", "alpha"), ("beta", "bravo"), ("acme", "base"), ("gamma", "base")]
        solo = {job: ask(url, keys[job[0]], job[1]) for job in jobs}
        assert len({solo[("acme", "alpha")], solo[("beta", "bravo")], solo[("acme", "base")]}) == 3
        assert solo[("acme", "base")] == solo[("gamma", "base")]

        generator.stats.batch_sizes.clear()
        with ThreadPoolExecutor(max_workers=8) as pool:
            for _ in range(3):  # repeated interleaving: every row must match its own solo answer, every time
                batch = jobs * 2
                answers = list(pool.map(lambda job: ask(url, keys[job[0]], job[1]), batch))
                assert answers == [solo[job] for job in batch]
        assert max(generator.stats.batch_sizes) > 1  # rows of different adapters really shared batches

        acme = listed(url, keys["acme"])
        assert set(acme) == {"alpha"}
        alpha = acme["alpha"]
        assert {"id", "name", "base_model", "method", "metrics", "residency", "pinned", "loss_plot_url", "created_at",
                "load_time_ms", "last_used", "requests", "tokens"} <= set(alpha)
        assert alpha["residency"] == "gpu" and alpha["method"] == "lora" and alpha["metrics"]["steps"] == 3
        assert alpha["requests"] == 7 and alpha["tokens"] > 0 and alpha["load_time_ms"] > 0
        assert alpha["loss_plot_url"] is None and alpha["pinned"] is False
        # its manifest records no prompt format (written as before the field existed: format 1), and today's is 2
        assert len(alpha["warnings"]) == 1 and "prompt format 1" in alpha["warnings"][0]
        metrics = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
        assert 'lorag_adapter_requests_total{adapter="alpha",tenant="acme"} 7.0' in metrics
        assert 'lorag_adapter_residency{adapter="alpha",tenant="acme"} 2.0' in metrics

        # Tenant beta cannot see, use, load, unload or delete acme's adapter: 404 everywhere.
        assert "alpha" not in listed(url, keys["beta"])
        for method, path in [("GET", "/v1/adapters/alpha"), ("POST", "/v1/adapters/alpha/load"),
                             ("POST", "/v1/adapters/alpha/unload"), ("DELETE", "/v1/adapters/alpha"),
                             ("GET", "/v1/adapters/alpha/loss.png"), ("GET", "/v1/models/alpha")]:
            assert api(url, keys["beta"], method, path).status_code == 404, (method, path)
        from openai import NotFoundError

        with pytest.raises(NotFoundError):
            ask(url, keys["beta"], "alpha")
        assert ask(url, keys["acme"], "alpha") == solo[("acme", "alpha")]  # still there for its owner

        # The admin acts as a tenant through the header, and sees only that tenant's adapters.
        admin = httpx.get(f"{url}/v1/adapters", headers={"Authorization": f"Bearer {ADMIN_KEY}",
                                                         "X-Lorag-Tenant": "beta"}).json()
        assert [a["name"] for a in admin["data"]] == ["bravo"]


def test_hot_add_replace_and_delete_while_answers_stream(
    data_dir, tiny_llama_path, adapter_sources, retrieval_service, tmp_path
):
    install(adapter_sources["alpha"], data_dir, "acme", "alpha")
    install(adapter_sources["charlie"], data_dir, "gamma", "charlie")  # references for the replacement weights
    install(adapter_sources["delta"], data_dir, "gamma", "delta")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    import shutil

    shutil.copytree(adapter_sources["delta"], allowed / "delta")
    with adapter_server(data_dir, tiny_llama_path, retrieval_service, allowed_paths=[str(allowed)]) as (url, keys, _):
        old = ask(url, keys["acme"], "alpha", max_tokens=48)
        charlie = ask(url, keys["gamma"], "charlie", max_tokens=48)
        delta = ask(url, keys["gamma"], "delta", max_tokens=48)
        assert len({old, charlie, delta}) == 3

        # Replace alpha through the API while an answer with the old alpha streams: it finishes on the old one.
        first, chunks = open_stream(url, keys["acme"], "alpha")
        replaced = api(url, keys["acme"], "POST", "/v1/adapters", data={"name": "alpha", "overwrite": "true"},
                       files={"file": ("charlie.tar.gz", tar_of(adapter_sources["charlie"]), "application/gzip")})
        assert replaced.status_code == 201, replaced.text
        assert ask(url, keys["acme"], "alpha", max_tokens=48) == charlie  # new requests get the new version
        assert finish(first, chunks) == old

        # Hot add on disk (as `lorag train` does) while a stream runs: discovered without restart.
        first, chunks = open_stream(url, keys["acme"], "alpha")
        install(adapter_sources["delta"], data_dir, "beta", "fresh")
        wait_until(lambda: "fresh" in listed(url, keys["beta"]))
        assert ask(url, keys["beta"], "fresh", max_tokens=48) == delta
        assert finish(first, chunks) == charlie

        # Delete while streaming: the running answer completes on its version, then the name is gone.
        first, chunks = open_stream(url, keys["acme"], "alpha")
        assert api(url, keys["acme"], "DELETE", "/v1/adapters/alpha").json()["deleted"] is True
        assert finish(first, chunks) == charlie
        assert "alpha" not in listed(url, keys["acme"])
        assert api(url, keys["acme"], "GET", "/v1/adapters/alpha").status_code == 404

        # Server-side paths: only under adapters.allowed_paths; vLLM's load_lora_adapter body works too.
        outside = api(url, keys["acme"], "POST", "/v1/adapters",
                      json={"name": "x", "path": str(adapter_sources["delta"])})
        assert outside.status_code == 403, outside.text
        loaded = api(url, keys["acme"], "POST", "/v1/load_lora_adapter",
                     json={"lora_name": "from-path", "lora_path": str(allowed / "delta")})
        assert loaded.status_code == 200, loaded.text
        assert listed(url, keys["acme"])["from-path"]["residency"] == "gpu"
        assert ask(url, keys["acme"], "from-path", max_tokens=48) == delta

        # A bad upload is refused with the reason and leaves the served set untouched.
        before = listed(url, keys["acme"]).keys()
        bad = tmp_path / "bad"
        shutil.copytree(adapter_sources["alpha"], bad)
        (bad / "adapter_model.safetensors").unlink()
        (bad / "adapter_model.bin").write_bytes(b"pickle")
        refused = api(url, keys["acme"], "POST", "/v1/adapters", data={"name": "bad"},
                      files={"file": ("bad.tar.gz", tar_of(bad), "application/gzip")})
        assert refused.status_code == 422 and "adapter_model.bin" in refused.json()["error"]["message"]
        assert listed(url, keys["acme"]).keys() == before
        assert ask(url, keys["acme"], "from-path", max_tokens=48) == delta


def test_one_device_slot_three_tenants_evicts_lru_and_answers_stay_exact(
    data_dir, tiny_llama_path, adapter_sources, retrieval_service
):
    tenants = {"acme": "alpha", "beta": "bravo", "gamma": "charlie"}
    for tenant, name in tenants.items():
        install(adapter_sources[name], data_dir, tenant, name)
    with adapter_server(data_dir, tiny_llama_path, retrieval_service, max_resident=1, max_host=1) as (url, keys, _):
        solo = {tenant: ask(url, keys[tenant], name) for tenant, name in tenants.items()}
        assert len(set(solo.values())) == 3

        def residencies():
            return {t: listed(url, keys[t])[n]["residency"] for t, n in tenants.items()}

        assert residencies() == {"acme": "disk", "beta": "host", "gamma": "gpu"}  # LRU: acme fell off host memory
        assert ask(url, keys["acme"], "alpha") == solo["acme"]
        assert residencies() == {"acme": "gpu", "beta": "disk", "gamma": "host"}

        errors = []

        def hammer(tenant):
            for _ in range(3):
                if ask(url, keys[tenant], tenants[tenant]) != solo[tenant]:
                    errors.append(tenant)

        threads = [threading.Thread(target=hammer, args=(t,)) for t in tenants]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert list(residencies().values()).count("gpu") == 1
        metrics = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
        evictions = next(line for line in metrics.splitlines() if line.startswith('lorag_adapter_events_total{event="evict"}'))
        assert float(evictions.split()[-1]) >= 4
