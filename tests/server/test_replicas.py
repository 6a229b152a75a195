"""Two `lorag serve` replicas on one PostgreSQL and one shared data dir, as behind a load balancer: a tenant
created through one authenticates on the other, a document uploaded through one is answered with citations
through the other, and an adapter uploaded through one is served by the other, neither restarted."""

import os
import secrets
import sys
from contextlib import ExitStack, contextmanager

import httpx
import pytest

from tests.adapters.conftest import make_adapter
from tests.adapters.test_serving import tar_of, wait_until
from tests.conftest import REPO_ROOT
from tests.server.processes import free_port, serving_process

pytestmark = pytest.mark.slow

ADMIN_KEY = secrets.token_urlsafe(32)
MEMO = "The Heron relay station is serviced every 45 days by the coastal crew; its logbook stays in locker B7."
QUESTION = "How often is the Heron relay station serviced?"


@contextmanager
def replica(data_dir, dsn, model, log_path):
    """One `lorag serve` process on a loopback port, ready to answer; stopped on exit."""
    port = free_port()
    env = os.environ | {
        "LORAG_RETRIEVAL__STORE": dsn, "LORAG_SERVER__ADMIN_KEY": ADMIN_KEY, "LORAG_GENERATION__MODEL": str(model),
        "LORAG_GENERATION__ENGINE": "transformers", "LORAG_GENERATION__FALLBACK": "error",
        "LORAG_ADAPTERS__POLL_INTERVAL_S": "0.5", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO_ROOT),
    }
    command = [sys.executable, "-m", "lorag.cli", "serve", "--port", str(port), "--data-dir", str(data_dir)]
    url = f"http://127.0.0.1:{port}"
    with serving_process(command, ready_url=f"{url}/readyz", log_path=log_path, env=env, timeout_s=240,
                         cwd=REPO_ROOT):
        yield url


def _as(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_two_replicas_share_tenants_documents_and_adapters(postgres_dsn, tiny_llama_path, tmp_path):
    from openai import OpenAI

    data_dir = tmp_path / "shared-data"  # what NFS or a shared volume would be
    with ExitStack() as stack:
        first = stack.enter_context(replica(data_dir, postgres_dsn, tiny_llama_path, tmp_path / "replica-1.log"))
        second = stack.enter_context(replica(data_dir, postgres_dsn, tiny_llama_path, tmp_path / "replica-2.log"))

        # A tenant created through the first replica authenticates on the second.
        created = httpx.post(f"{first}/v1/admin/tenants", json={"id": "acme"}, headers=_as(ADMIN_KEY), timeout=30)
        assert created.status_code == 201, created.text
        key = created.json()["api_key"]
        assert httpx.get(f"{second}/v1/models", headers=_as(key), timeout=30).status_code == 200
        assert httpx.get(f"{second}/v1/models", headers=_as("not-a-key"), timeout=30).status_code == 401

        # A document uploaded through the first is retrieved and cited through the second.
        uploaded = httpx.post(f"{first}/v1/documents", headers=_as(key), timeout=120,
                              files={"files": ("heron-memo.txt", MEMO.encode(), "text/plain")})
        assert uploaded.status_code in (200, 201), uploaded.text
        client = OpenAI(base_url=f"{second}/v1", api_key=key, max_retries=0, timeout=120)
        completion = client.chat.completions.create(
            model="base", messages=[{"role": "user", "content": QUESTION}], max_tokens=8,
            extra_body={"retrieval": {"attribution": False}})
        extra = completion.model_extra
        found = extra["citations"] + extra["context"]
        assert any(p["source"] == "heron-memo.txt" and "45 days" in p["text"] for p in found), found

        # An adapter uploaded through the first is listed and served by the second without a restart.
        adapter = make_adapter(tiny_llama_path, tmp_path / "support", seed=5)
        added = httpx.post(f"{first}/v1/adapters", headers=_as(key), data={"name": "support"}, timeout=120,
                           files={"file": ("support.tar.gz", tar_of(adapter), "application/gzip")})
        assert added.status_code == 201, added.text
        wait_until(lambda: any(card["id"] == "support" for card in
                               httpx.get(f"{second}/v1/models", headers=_as(key), timeout=30).json()["data"]))
        answered = client.chat.completions.create(
            model="support", messages=[{"role": "user", "content": QUESTION}], max_tokens=8)
        assert answered.model == "support" and answered.model_extra["generator"].startswith("transformers:")

        # Removing the tenant through the second stops its key on the first too.
        removed = httpx.delete(f"{second}/v1/admin/tenants/acme", params={"purge": "true"}, headers=_as(ADMIN_KEY),
                               timeout=30)
        assert removed.status_code == 200, removed.text
        wait_until(lambda: httpx.get(f"{first}/v1/models", headers=_as(key), timeout=30).status_code == 401)

        # A tenant created again under that id starts empty on every replica: the old index went with it.
        again = httpx.post(f"{first}/v1/admin/tenants", json={"id": "acme"}, headers=_as(ADMIN_KEY), timeout=30)
        assert again.status_code == 201, again.text
        new_key = again.json()["api_key"]
        for url in (first, second):
            empty = httpx.post(f"{url}/v1/retrieve", json={"query": QUESTION}, headers=_as(new_key), timeout=60)
            assert empty.status_code == 404 and empty.json()["error"]["code"] == "no_index", empty.text
