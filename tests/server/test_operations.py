"""What operators rely on: request ids, one log line per request, process metrics, honest health, clear errors."""

import json
import logging

import pytest

from server.log_format import JsonFormatter
from server.tenants import TenantRegistry
from tests.server.conftest import assert_error, auth

REQUEST_LOGGER = "lorag.requests"


def request_lines(caplog) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == REQUEST_LOGGER]


def test_healthz_on_a_ready_server_reports_what_is_loaded(client):
    health = client.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "generator": "extractive", "generator_kind": "extractive",
                             "retrieval": True}


def test_request_id_is_echoed_or_generated(client, corpus):
    given = client.get("/v1/models", headers=auth(corpus.acme_key, **{"X-Request-ID": "trace-42.a"}))
    assert given.headers["x-request-id"] == "trace-42.a"
    generated = client.get("/v1/models", headers=auth(corpus.acme_key))
    other = client.get("/v1/models", headers=auth(corpus.acme_key))
    assert len(generated.headers["x-request-id"]) == 32 and generated.headers["x-request-id"] != other.headers["x-request-id"]
    # A value that could forge log fields or headers is replaced, not echoed.
    forged = client.get("/v1/models", headers=auth(corpus.acme_key, **{"X-Request-ID": 'a" status=200 b'}))
    assert forged.headers["x-request-id"] != 'a" status=200 b' and len(forged.headers["x-request-id"]) == 32
    # Errors carry it too, including those raised before any route runs.
    assert client.get("/v1/models", headers={"X-Request-ID": "r-401"}).headers["x-request-id"] == "r-401"


def test_one_log_line_per_request_with_its_fields_and_never_the_key(client, corpus, caplog):
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    chat = {"model": "lorag", "messages": [{"role": "user", "content": "How long is the warranty?"}]}
    ok = client.post("/v1/chat/completions", json=chat, headers=auth(corpus.acme_key, **{"X-Request-ID": "chat-1"}))
    assert ok.status_code == 200, ok.text
    bad = client.post("/v1/retrieve", json={"query": "x", "k": 1000}, headers=auth(corpus.acme_key, **{"X-Request-ID": "bad-1"}))
    assert bad.status_code == 400
    unauthorised = client.get("/v1/models", headers=auth("lorag-wrong-key", **{"X-Request-ID": "auth-1"}))
    assert unauthorised.status_code == 401

    lines = {record.request["request_id"]: record for record in request_lines(caplog)}
    assert {"chat-1", "bad-1", "auth-1"} <= set(lines)
    assert sum(record.request["request_id"] == "chat-1" for record in request_lines(caplog)) == 1
    chat_line = lines["chat-1"].request
    assert chat_line["route"] == "/v1/chat/completions" and chat_line["method"] == "POST"
    assert chat_line["tenant"] == "acme" and chat_line["model"] == "lorag" and chat_line["status"] == 200
    assert chat_line["latency_ms"] >= 0 and chat_line["error"] is None
    bad_line = lines["bad-1"].request
    assert bad_line["status"] == 400 and "k=1000 is over the limit" in bad_line["error"]
    assert lines["auth-1"].request["status"] == 401 and "invalid API key" in lines["auth-1"].request["error"]

    for record in request_lines(caplog):
        for rendered in (logging.Formatter().format(record), JsonFormatter().format(record)):
            assert corpus.acme_key not in rendered and "lorag-wrong-key" not in rendered
    entry = json.loads(JsonFormatter().format(lines["chat-1"]))
    assert entry["level"] == "INFO" and entry["logger"] == REQUEST_LOGGER
    assert {k: entry[k] for k in ("request_id", "tenant", "route", "model", "status")} == {
        "request_id": "chat-1", "tenant": "acme", "route": "/v1/chat/completions", "model": "lorag", "status": 200}


def test_metrics_include_process_metrics(client, corpus):
    text = client.get("/metrics", headers=auth(corpus.admin_key)).text
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds", "python_info"):
        assert f"\n{name}" in text, name


@pytest.fixture
def unindexed_tenant(corpus):
    """A tenant with a key but no documents, removed again so other modules see the usual two."""
    registry = TenantRegistry(corpus.data_dir)
    _, key = registry.add("gamma")
    yield key
    registry.remove("gamma")


def test_retrieve_without_an_index_is_a_clear_404(client, unindexed_tenant):
    response = client.post("/v1/retrieve", json={"query": "warranty"}, headers=auth(unindexed_tenant))
    error = assert_error(response, 404)
    assert error["code"] == "no_index"
    assert "tenant 'gamma' has no indexed documents" in error["message"] and "lorag ingest" in error["message"]


def test_a_sources_filter_matching_nothing_says_so(client, corpus):
    response = client.post("/v1/retrieve", json={"query": "warranty", "sources": ["no-such-file.pdf"]},
                           headers=auth(corpus.acme_key))
    error = assert_error(response, 404, param="sources")
    assert "['no-such-file.pdf'] match no document of tenant 'acme'" in error["message"]
    # A chat request's filter is checked the same way, instead of silently searching every document.
    chat = {"model": "lorag", "messages": [{"role": "user", "content": "warranty?"}],
            "retrieval": {"sources": ["no-such-file.pdf"]}}
    error = assert_error(client.post("/v1/chat/completions", json=chat, headers=auth(corpus.acme_key)), 404)
    assert "match no document" in error["message"]


@pytest.mark.slow
def test_lorag_serve_writes_json_log_lines(tmp_path):
    """A real `lorag serve --log-format json`: every line it writes is a JSON object, one per request."""
    import os
    import socket
    import subprocess
    import sys
    import time

    import httpx

    from tests.conftest import REPO_ROOT

    data_dir = tmp_path / "data"
    _, key = TenantRegistry(data_dir).add("acme")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    server = subprocess.Popen(
        [sys.executable, "-m", "lorag.cli", "serve", "--generator", "extractive", "--port", str(port),
         "--log-format", "json", "--data-dir", str(data_dir)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # a hang guard: the embedder loads first
        while True:
            assert server.poll() is None, server.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the server never became ready"
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        models = httpx.get(f"{base}/v1/models", headers=auth(key, **{"X-Request-ID": "e2e-models"}))
        assert models.status_code == 200 and models.headers["x-request-id"] == "e2e-models"
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=60)
    lines = [line for line in stderr.splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line, uvicorn's own included, is JSON
    assert any(entry["logger"].startswith("uvicorn") for entry in entries)
    [request] = [entry for entry in entries if entry.get("request_id") == "e2e-models"]
    assert request["route"] == "/v1/models" and request["tenant"] == "acme" and request["status"] == 200
    assert key not in stderr
