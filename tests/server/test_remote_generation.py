"""generation.engine = "remote": lorag's real server (real uvicorn, the official openai client, real retrieval
and attribution) generating on fake vLLM servers that answer as vLLM 0.32 does (tests/server/fake_vllm.py)."""

import json
import logging
import re
import socket
from contextlib import contextmanager

import httpx
import pytest

from tests.adapters.conftest import install, make_adapter
from tests.server.conftest import ADMIN_KEY, assert_error, auth
from tests.server.fake_vllm import FakeVllm

BASE = "tiny-llama"  # the name the fake servers serve the base model under
MEMO = ("The Heron launch code is 7741 and the launch is set for March.\n\n"
        "The Heron team meets every Tuesday in room 12.\n")
QUESTION = "What is the Heron launch code?"


@pytest.fixture(scope="module")
def remote_data(tmp_path_factory, corpus, tiny_llama_path):
    """A data dir with the memo ingested for tenants 'acme' and 'beta', each with an adapter named 'support'."""
    from ingest.pipeline import ingest_paths
    from retrieval.service import RetrievalService
    from server.settings import ServerSettings
    from server.tenants import TenantRegistry

    data_dir = tmp_path_factory.mktemp("remote-data")
    docs = tmp_path_factory.mktemp("remote-docs")
    (docs / "memo.txt").write_text(MEMO)
    settings = ServerSettings(data_dir=data_dir)
    retrieval = RetrievalService(settings, embedder=corpus.retrieval.embedder)
    keys = {}
    for tenant in ("acme", "beta"):
        report = ingest_paths([docs], tenant=tenant, settings=settings, embedder=retrieval.embedder)
        assert report.failed == 0, report
        keys[tenant] = TenantRegistry(data_dir).add(tenant)[1]
    root = tmp_path_factory.mktemp("remote-adapters")
    sources = {tenant: make_adapter(tiny_llama_path, root / tenant, seed=seed, tenant=tenant)
               for seed, tenant in ((11, "acme"), (12, "beta"))}
    for tenant, source in sources.items():
        install(source, data_dir, tenant, "support")
    return data_dir, retrieval, keys, sources


@pytest.fixture
def fakes():
    servers = [FakeVllm(BASE).start(), FakeVllm(BASE).start()]
    yield servers
    for server in servers:
        server.stop()


@contextmanager
def lorag(remote_data, tiny_llama_path, urls, *, adapters=None, **generation):
    """lorag's real app on uvicorn, generating remotely on ``urls``; yields (base URL, app)."""
    from server.app import create_app
    from server.background import serving
    from server.settings import ServerSettings

    data_dir, retrieval, _, _ = remote_data
    settings = ServerSettings(
        data_dir=data_dir, server={"admin_key": ADMIN_KEY},
        generation={"engine": "remote", "remote_url": urls, "model": str(tiny_llama_path), "fallback": "error",
                    "remote_health_interval_s": 0, **generation},
        adapters={"poll_interval_s": 0, **(adapters or {})},
    )
    app = create_app(settings, retrieval=retrieval)
    with serving(app) as base_url:
        yield base_url, app


def openai_client(base_url, key):
    from openai import OpenAI

    return OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0)


def ask(base_url, key, model="base", **options):
    return openai_client(base_url, key).chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=32, **options)


def pool(app):
    return app.state.services.generator.pool


def app_context_tokens(app) -> int:
    return app.state.services.generator.context_tokens


def adapter_key(app, tenant: str, name: str = "support") -> str:
    return app.state.services.adapters._entry(tenant, name).version.key


def test_answer_with_citations_streaming_and_usage(remote_data, tiny_llama_path, fakes):
    fake = fakes[0]
    _, _, keys, _ = remote_data
    with lorag(remote_data, tiny_llama_path, [fake.url]) as (base_url, _app):
        completion = ask(base_url, keys["acme"])
        extra = completion.model_extra
        assert extra["generator"] == f"remote:{BASE}"
        assert "7741" in completion.choices[0].message.content
        assert [c["source"] for c in extra["citations"]] == ["memo.txt"]
        assert extra["attribution"]["supported"] == 1
        sent = fake.state.requests[-1]
        assert sent["model"] == BASE and sent["stream"] is True and sent["max_tokens"] == 32
        assert '<document number="1" source="memo.txt"' in sent["messages"][-1]["content"]  # lorag's prompt
        words = len("The Heron launch code is 7741 and the launch is set for March [1].".split())
        assert completion.usage.completion_tokens == words  # as the remote counted them
        assert completion.usage.prompt_tokens == sum(len(m["content"].split()) for m in sent["messages"])

        # Without max_tokens the answer may use the rest of the context, and vLLM is told how much that is.
        openai_client(base_url, keys["acme"]).chat.completions.create(
            model="base", messages=[{"role": "user", "content": QUESTION}])
        sent = fake.state.requests[-1]
        context = app_context_tokens(_app)
        assert 0 < sent["max_tokens"] < context and sent["max_tokens"] >= context // 4

        chunks = list(ask(base_url, keys["acme"], stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert "7741" in text and len(chunks) > 3  # passed through piece by piece
        final = chunks[-1].model_extra
        assert [c["source"] for c in final["citations"]] == ["memo.txt"]
        assert chunks[-1].usage.completion_tokens == words


def test_adapter_pushed_requested_repushed_after_restart_and_unloaded_on_delete(remote_data, tiny_llama_path, fakes):
    fake = fakes[0]
    data_dir, _, keys, sources = remote_data
    with lorag(remote_data, tiny_llama_path, [fake.url]) as (base_url, app):
        ask(base_url, keys["acme"], model="support")
        name = adapter_key(app, "acme")
        assert fake.state.loras == {name: str(data_dir / "tenants" / "acme" / "adapters" / "support")}
        assert fake.state.requests[-1]["model"] == name

        fake.restart()  # vLLM forgets runtime adapters
        assert fake.state.loras == {}
        answer = ask(base_url, keys["acme"], model="support")
        assert "7741" in answer.choices[0].message.content
        assert name in fake.state.loras
        assert [r["model"] for r in fake.state.requests[-2:]] == [name, name]  # a 404, then the retry

        fake.restart()
        pool(app).probe_all()  # the health poll notices the adapter is missing and pushes it without a request
        assert name in fake.state.loras

        try:
            response = httpx.delete(f"{base_url}/v1/adapters/support", headers=auth(keys["acme"]))
            assert response.status_code == 200, response.text
            assert fake.state.loras == {}
        finally:
            install(sources["acme"], data_dir, "acme", "support")  # the other tests use it


def test_tenants_adapters_of_the_same_name_never_collide(remote_data, tiny_llama_path, fakes):
    fake = fakes[0]
    _, _, keys, _ = remote_data
    with lorag(remote_data, tiny_llama_path, [fake.url]) as (base_url, app):
        ask(base_url, keys["acme"], model="support")
        ask(base_url, keys["beta"], model="support")
        acme, beta = adapter_key(app, "acme"), adapter_key(app, "beta")
        assert acme != beta and set(fake.state.loras) == {acme, beta}
        assert [r["model"] for r in fake.state.requests[-2:]] == [acme, beta]
        # vLLM's name of another tenant's adapter is no model name a tenant may use
        response = httpx.post(f"{base_url}/v1/chat/completions", headers=auth(keys["beta"]),
                              json={"model": acme, "messages": [{"role": "user", "content": QUESTION}]})
        assert_error(response, 404, param="model")


def test_failover_to_another_server_on_5xx_and_dead_server(remote_data, tiny_llama_path, fakes):
    first, second = fakes
    _, _, keys, _ = remote_data
    first.state.fail_chat = [500, 500]
    with lorag(remote_data, tiny_llama_path, [first.url, second.url]) as (base_url, app):
        for _ in range(2):  # the two requests start on different servers: one of them starts on the failing one
            assert "7741" in ask(base_url, keys["acme"]).choices[0].message.content
        assert pool(app).failovers >= 1
        metrics = httpx.get(f"{base_url}/metrics", headers=auth(ADMIN_KEY)).text
        assert f'lorag_remote_failures_total{{reason="chat_500",server="{first.url}"}}' in metrics

        first.stop()
        for _ in range(2):  # one of them starts on the dead server
            chunks = list(ask(base_url, keys["acme"], stream=True))
            assert "7741" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        health = httpx.get(f"{base_url}/healthz").json()
        assert {s["server"]: s["up"] for s in health["remote"]} == {first.url: False, second.url: True}
        metrics = httpx.get(f"{base_url}/metrics", headers=auth(ADMIN_KEY)).text
        assert f'lorag_remote_up{{server="{first.url}"}} 0.0' in metrics
        assert f'lorag_remote_up{{server="{second.url}"}} 1.0' in metrics


def test_a_server_silent_past_the_timeout_is_replaced(remote_data, tiny_llama_path, fakes):
    slow, fast = fakes
    _, _, keys, _ = remote_data
    slow.state.stall_chat = [3.0, 3.0]
    with lorag(remote_data, tiny_llama_path, [slow.url, fast.url], remote_timeout_s=0.5) as (base_url, app):
        for _ in range(2):  # one of the two starts on the silent server
            assert "7741" in ask(base_url, keys["acme"]).choices[0].message.content
        assert len(slow.state.requests) >= 1 and pool(app).failovers >= 1
        assert pool(app).failures[(slow.url, "unreachable")] >= 1


def test_a_server_dying_mid_answer_ends_the_stream_with_an_error_and_no_retry(remote_data, tiny_llama_path, fakes):
    fake = fakes[0]
    _, _, keys, _ = remote_data
    fake.state.die_after_words = 3
    with lorag(remote_data, tiny_llama_path, [fake.url, fakes[1].url]) as (base_url, _app):
        body = {"model": "base", "stream": True, "messages": [{"role": "user", "content": QUESTION}]}
        for _ in range(2):  # make sure one request started on the dying server
            with httpx.stream("POST", f"{base_url}/v1/chat/completions", headers=auth(keys["acme"]), json=body,
                              timeout=30) as response:
                assert response.status_code == 200
                events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
            if fake.state.requests and not fakes[1].state.requests:
                break
            fakes[1].state.requests.clear()
        assert len(fake.state.requests) == 1 and fakes[1].state.requests == []  # text had streamed: no retry
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "remote_error" and "stopped mid-answer" in error["message"]
        streamed = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-2])
        assert streamed == "The Heron launch"


def test_no_server_answering_is_a_clean_503_and_failing_servers_a_502(remote_data, tiny_llama_path, fakes):
    from openai import APIStatusError

    first, second = fakes
    _, _, keys, _ = remote_data
    with lorag(remote_data, tiny_llama_path, [first.url, second.url]) as (base_url, _app):
        first.state.fail_chat, second.state.fail_chat = [502], [500]
        response = httpx.post(f"{base_url}/v1/chat/completions", headers=auth(keys["acme"]),
                              json={"model": "base", "messages": [{"role": "user", "content": QUESTION}]})
        error = assert_error(response, 502, error_type="server_error")
        assert error["code"] == "remote_error"

        first.stop()
        second.stop()
        for stream in (False, True):
            with pytest.raises(APIStatusError) as raised:
                result = ask(base_url, keys["acme"], stream=stream)
                list(result) if stream else None
            assert raised.value.status_code == 503
            assert raised.value.body["code"] == "remote_unavailable"
            assert "could be reached" in raised.value.body["message"]
            assert first.url not in raised.value.message and second.url not in raised.value.message  # log only
        ready = httpx.get(f"{base_url}/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "unavailable"


def test_an_adapter_path_the_servers_cannot_read_is_refused_naming_it_in_the_log(
        remote_data, tiny_llama_path, fakes, caplog):
    fake = fakes[0]
    _, _, keys, _ = remote_data
    mount = "/srv/not-mounted/lorag"
    with lorag(remote_data, tiny_llama_path, [fake.url], remote_adapter_dir=mount) as (base_url, _app):
        with caplog.at_level(logging.ERROR, logger="server.generation.remote_pool"):
            response = httpx.post(f"{base_url}/v1/chat/completions", headers=auth(keys["acme"]),
                                  json={"model": "support", "messages": [{"role": "user", "content": QUESTION}]})
        error = assert_error(response, 502)
        assert error["code"] == "adapter_unreadable" and "cannot read its directory" in error["message"]
        assert mount not in response.text  # a tenant never sees server paths
        assert f"{mount}/tenants/acme/adapters/support" in caplog.text
        assert fake.state.loras == {}


def test_remote_api_key_is_sent(remote_data, tiny_llama_path, monkeypatch):
    fake = FakeVllm(BASE, api_key="vllm-secret").start()
    _, _, keys, _ = remote_data
    try:
        monkeypatch.setenv("LORAG_GENERATION__REMOTE_API_KEY", "vllm-secret")
        with lorag(remote_data, tiny_llama_path, [fake.url]) as (base_url, _app):
            assert "7741" in ask(base_url, keys["acme"]).choices[0].message.content
        assert httpx.get(f"{fake.url}/v1/models").status_code == 401  # the fake does check it
    finally:
        fake.stop()


def test_remote_settings_are_checked(monkeypatch):
    from pydantic import ValidationError

    from server.settings import ServerSettings

    monkeypatch.setenv("LORAG_GENERATION__ENGINE", "remote")
    monkeypatch.setenv("LORAG_GENERATION__REMOTE_URL", "http://gpu1:8000/v1, http://gpu2:8000/")
    assert ServerSettings().generation.remote_url == ["http://gpu1:8000", "http://gpu2:8000"]
    monkeypatch.setenv("LORAG_GENERATION__REMOTE_URL", "gpu1:8000")
    with pytest.raises(ValidationError, match=re.escape("generation.remote_url 'gpu1:8000' is not an http(s) URL")):
        ServerSettings()
    monkeypatch.delenv("LORAG_GENERATION__REMOTE_URL")
    with pytest.raises(ValidationError, match="names no vLLM server"):
        ServerSettings()


def test_startup_without_a_reachable_server_or_model_name_fails_clearly(tiny_llama_path):
    from core.errors import LoragError
    from server.generation.factory import load_generator
    from server.settings import GenerationSettings

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    settings = GenerationSettings(engine="remote", remote_url=[url], model=str(tiny_llama_path))
    with pytest.raises(LoragError, match="generation.remote_model is not set and no vLLM server"):
        load_generator(settings)


def test_pushing_an_adapter_already_loaded_by_another_replica_and_refusals(remote_data, fakes):
    from core.errors import Conflict
    from server.errors import RemoteFailed
    from server.generation.remote_pool import RemotePool

    fake = fakes[0]
    path = str(remote_data[3]["acme"])
    replicas = [RemotePool([fake.url], api_key=None, timeout_s=5) for _ in range(2)]
    try:
        for pool in replicas:  # the second gets vLLM's 400 "has already been loaded": the same version is there
            pool.register("acme:support@0123456789ab", path)
            assert pool.servers[0].loaded == {"acme:support@0123456789ab"}
        replicas[0].unregister("acme:support@0123456789ab")
        replicas[1].unregister("acme:support@0123456789ab")  # vLLM's 404 "cannot be found": nothing left to do
        assert fake.state.loras == {}

        fake.state.runtime_lora = False  # vLLM started without VLLM_ALLOW_RUNTIME_LORA_UPDATING
        with pytest.raises(RemoteFailed, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"):
            replicas[0].register("acme:support@0123456789ab", path)
        fake.state.runtime_lora = True

        fake.state.max_lora_rank = 2  # vLLM refuses ranks over --max-lora-rank
        with pytest.raises(Conflict, match="LoRA rank 4 is greater than max_lora_rank 2"):
            replicas[0].register("acme:support@0123456789ab", path)
        assert replicas[0].adapters == {} and fake.state.loras == {}
    finally:
        for pool in replicas:
            pool.close()


def test_the_servers_max_model_len_bounds_the_prompt(remote_data, tiny_llama_path):
    fake = FakeVllm(BASE, max_model_len=300).start()
    _, _, keys, _ = remote_data
    try:
        with lorag(remote_data, tiny_llama_path, [fake.url]) as (base_url, _app):
            body = {"model": "base", "max_tokens": 300, "messages": [{"role": "user", "content": QUESTION}]}
            response = httpx.post(f"{base_url}/v1/chat/completions", headers=auth(keys["acme"]), json=body)
            error = assert_error(response, 400)
            assert "300-token context of remote:tiny-llama" in error["message"]
            assert fake.state.requests == []  # refused before it reached vLLM
    finally:
        fake.stop()


def test_a_runtime_adapter_the_servers_refuse_is_not_left_listed(remote_data, tiny_llama_path, fakes, tmp_path):
    """vLLM refusing the push (rank over --max-lora-rank) fails POST /v1/load_lora_adapter and leaves no copy
    behind: the name is not listed, and once vLLM takes it the same request succeeds."""
    import shutil

    fake = fakes[0]
    data_dir, _, keys, sources = remote_data
    allowed = tmp_path / "allowed"
    shutil.copytree(sources["acme"], allowed / "rt")
    body = {"lora_name": "runtime", "lora_path": str(allowed / "rt")}
    with lorag(remote_data, tiny_llama_path, [fake.url], adapters={"allowed_paths": [str(allowed)]}) as (base_url, _):
        fake.state.max_lora_rank = 2
        refused = httpx.post(f"{base_url}/v1/load_lora_adapter", json=body, headers=auth(keys["acme"]))
        assert refused.status_code == 409, refused.text
        models = httpx.get(f"{base_url}/v1/models", headers=auth(keys["acme"])).json()["data"]
        assert "runtime" not in {card["id"] for card in models}
        fake.state.max_lora_rank = 64
        loaded = httpx.post(f"{base_url}/v1/load_lora_adapter", json=body, headers=auth(keys["acme"]))
        assert loaded.status_code == 200, loaded.text
        httpx.post(f"{base_url}/v1/unload_lora_adapter", json={"lora_name": "runtime"}, headers=auth(keys["acme"]))
