"""Deciding up front whether a hub id can be loaded: hub ids vs paths, the local cache, a hub that answers or not."""

import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from huggingface_hub import constants

from core.errors import LoragError
from models.hub import cached_snapshot, hub_reachable, locate_hub_model, looks_like_hub_id

REPO = "lorag-tests/cached-model"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An HF cache in tmp_path holding REPO's config.json, as a download leaves it."""
    snapshot = tmp_path / "hub" / "models--lorag-tests--cached-model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return snapshot


@pytest.fixture
def answering_server():
    """A local HTTP server answering HEAD with the status in ``server.status``; yields (server, url)."""

    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(self.server.status)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    server.status = 200
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _closed_port_url() -> str:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def test_hub_ids_and_paths_are_told_apart(tmp_path, monkeypatch):
    assert looks_like_hub_id("Qwen/Qwen2.5-0.5B-Instruct") and looks_like_hub_id("gpt2")
    assert not looks_like_hub_id(str(tmp_path / "missing-model"))
    assert not looks_like_hub_id("./models/qwen") and not looks_like_hub_id("~/models/qwen")
    assert not looks_like_hub_id("a/b/c")  # a hub id has at most one slash
    (tmp_path / "org" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not looks_like_hub_id("org/model")  # an existing relative directory wins


def test_reachability_is_an_answer_below_500_within_the_timeout(answering_server):
    server, url = answering_server
    assert hub_reachable(url)
    server.status = 404  # the hub answering "no such thing" is still the hub answering
    assert hub_reachable(url)
    server.status = 503  # a gateway that cannot reach it
    assert not hub_reachable(url)
    started = time.perf_counter()
    assert not hub_reachable(_closed_port_url(), timeout_s=5)
    assert time.perf_counter() - started < 4  # a refused connection answers at once, not at the timeout


def test_a_cached_model_loads_from_its_snapshot_when_the_hub_is_silent(hub_cache, monkeypatch):
    assert cached_snapshot(REPO) == hub_cache and cached_snapshot("lorag-tests/other") is None
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert locate_hub_model(REPO) == REPO  # offline mode: transformers reads the cache itself
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", _closed_port_url())
    assert locate_hub_model(REPO) == str(hub_cache)


def test_an_uncached_model_is_refused_at_once_with_the_reason(hub_cache, monkeypatch, answering_server):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(LoragError, match=r"'lorag-tests/other' is not in the local hub cache .* offline mode is on"):
        locate_hub_model("lorag-tests/other")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", _closed_port_url())
    with pytest.raises(LoragError, match=r"did not answer within 2 s.*hf download lorag-tests/other"):
        locate_hub_model("lorag-tests/other")
    _, url = answering_server
    monkeypatch.setattr(constants, "ENDPOINT", url)
    assert locate_hub_model("lorag-tests/other") == "lorag-tests/other"  # the hub answers: let transformers download
