"""Abandoned chat requests stop costing anything: one cut off by server.request_timeout_s (504) and one whose
client leaves, while generating or still queued, cancel the work behind them, so the next request is not
served after it. A real uvicorn server, the tiny Llama that never ends a turn, the openai client and httpx."""

import asyncio
import time

import httpx
import pytest

from tests.server.conftest import ADMIN_KEY, server_settings

pytestmark = pytest.mark.slow

QUESTION = "What is the accuracy of the dissolved oxygen sensor?"
LONG = 2000  # tokens: far more than the endless model writes before any client or timeout gives up


@pytest.fixture
def endless_generator(endless_llama_path):
    from server.generation.transformers_generator import TransformersGenerator

    generator = TransformersGenerator.from_pretrained(str(endless_llama_path), device="cpu")
    yield generator
    asyncio.run(generator.close())


def _serve(corpus, generator, **server):
    from server.app import create_app
    from server.background import serving

    return serving(create_app(server_settings(corpus, **server), retrieval=corpus.retrieval, generator=generator))


def _chat(base_url: str, key: str, *, max_tokens: int, timeout: float = 60.0, stream: bool = False):
    payload = {"model": "lorag", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": max_tokens,
               "temperature": 0, "stream": stream}
    return httpx.post(f"{base_url}/v1/chat/completions", json=payload, timeout=timeout,
                      headers={"Authorization": f"Bearer {key}"})


def _metric(base_url: str, name: str) -> float:
    lines = httpx.get(f"{base_url}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name))


def _until_idle(base_url: str) -> None:
    for _ in range(600):
        if _metric(base_url, "lorag_chat_in_flight") == 0 and _metric(base_url, "lorag_chat_queued") == 0:
            return
        time.sleep(0.05)
    raise AssertionError("chat requests still in flight or queued")


def test_a_timed_out_request_stops_generating_before_the_next_is_served(corpus, endless_generator):
    stats = endless_generator.stats
    with _serve(corpus, endless_generator, request_timeout_s=1.0, max_concurrent_requests=1) as base_url:
        timed_out = _chat(base_url, corpus.acme_key, max_tokens=LONG)
        assert timed_out.status_code == 504 and timed_out.json()["error"]["code"] == "timeout"
        started = time.perf_counter()
        quick = _chat(base_url, corpus.acme_key, max_tokens=4)
        quick_s = time.perf_counter() - started
        assert quick.status_code == 200, quick.text
        assert quick.json()["usage"]["completion_tokens"] == 4
    print(f"\ntimed out after {stats.generated_tokens - 4} of {LONG} tokens; the next request took {quick_s:.2f} s")
    # The quick answer came from a worker that had dropped the timed-out row, not one that wrote all its tokens.
    assert stats.finish_reasons["cancelled"] == 1 and stats.finish_reasons["length"] == 1
    assert stats.generated_tokens < LONG


def test_a_client_leaving_while_queued_never_gets_a_slot(corpus, endless_generator):
    stats = endless_generator.stats
    with _serve(corpus, endless_generator, max_concurrent_requests=1, max_queued_requests=4,
                tenant_queue_share=1.0) as base_url:
        payload = {"model": "lorag", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": LONG,
                   "temperature": 0, "stream": True}
        headers = {"Authorization": f"Bearer {corpus.acme_key}"}
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=payload, headers=headers) as held:
            lines = held.iter_lines()
            next(lines)  # this stream holds the only slot
            retrievals = _metric(base_url, "lorag_retrieval_seconds_count")
            for stream in (False, True):  # both kinds of client give up while queued behind it
                with pytest.raises(httpx.ReadTimeout):
                    _chat(base_url, corpus.acme_key, max_tokens=LONG, timeout=0.5, stream=stream)
            for _ in range(100):  # the server notices that the queued clients left
                if _metric(base_url, "lorag_chat_queued") == 0:
                    break
                time.sleep(0.05)
            assert _metric(base_url, "lorag_chat_queued") == 0
        _until_idle(base_url)
        quick = _chat(base_url, corpus.acme_key, max_tokens=4)
        assert quick.status_code == 200, quick.text
        # Neither abandoned request was retrieved for or generated: only the held stream and the quick one ran.
        assert _metric(base_url, "lorag_retrieval_seconds_count") == retrievals + 1
    assert stats.finish_reasons["cancelled"] == 1 and stats.finish_reasons["length"] == 1
