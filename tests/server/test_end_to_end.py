"""A real uvicorn server on a free loopback port, spoken to with the official openai client and
LangChain's ChatOpenAI: the tiny transformers model (generated text) and the extractive generator (citations)."""

import time

import httpx
import pytest

from tests.server.conftest import ADMIN_KEY, server_settings

pytestmark = pytest.mark.slow

PDF_QUESTION = "What is the accuracy of the dissolved oxygen sensor?"


@pytest.fixture(scope="module")
def tiny_server(corpus, endless_llama_path):
    from server.app import create_app
    from server.background import serving

    settings = server_settings(corpus)
    settings.generation.model = str(endless_llama_path)
    settings.generation.fallback = "error"  # a load failure must fail the test, not hide behind extractive
    with serving(create_app(settings, retrieval=corpus.retrieval)) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def extractive_server(corpus, extractive_generator):
    from server.app import create_app
    from server.background import serving

    app = create_app(server_settings(corpus), retrieval=corpus.retrieval, generator=extractive_generator)
    with serving(app) as base_url:
        yield base_url


def _openai(base_url, key):
    from openai import OpenAI

    return OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0)


def test_tiny_model_non_streaming_and_streaming(tiny_server, corpus):
    client = _openai(tiny_server, corpus.acme_key)
    completion = client.chat.completions.create(
        model="lorag", messages=[{"role": "user", "content": PDF_QUESTION}], max_tokens=8, seed=0
    )
    extra = completion.model_extra
    # the model's server path stays on the server: clients see its folder name
    assert extra["generator"].startswith("transformers:.../") and "/tmp" not in extra["generator"]
    import httpx

    for probe in ("/readyz", "/healthz"):
        assert "/tmp" not in httpx.get(f"{tiny_server}{probe}").text
    listed = [card.id for card in client.models.list().data]
    assert not any("/tmp" in name for name in listed) and any(name.startswith(".../") for name in listed)
    assert isinstance(completion.choices[0].message.content, str)
    assert 0 < completion.usage.completion_tokens <= 8
    assert completion.usage.prompt_tokens > 0
    # A random model cites nothing; what it was shown comes back as uncited context.
    assert extra["context"] and all(p["id"] for p in extra["context"])

    chunks = list(client.chat.completions.create(
        model="lorag", messages=[{"role": "user", "content": PDF_QUESTION}], max_tokens=8, stream=True
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    final = chunks[-1]
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.model_extra["generator"].startswith("transformers:.../")
    assert "citations" in final.model_extra and final.model_extra["context"]


def test_tiny_model_through_langchain(tiny_server, corpus):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=f"{tiny_server}/v1", api_key=corpus.acme_key, model="lorag", max_tokens=8,
                      max_retries=0)
    message = chat.invoke(PDF_QUESTION)
    assert isinstance(message.content, str)
    assert message.response_metadata["token_usage"]["completion_tokens"] > 0
    streamed = list(chat.stream(PDF_QUESTION))
    assert streamed


def test_unknown_model_through_openai_client(tiny_server, corpus):
    import openai

    with pytest.raises(openai.NotFoundError) as raised:
        _openai(tiny_server, corpus.acme_key).chat.completions.create(
            model="not-a-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert raised.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        _openai(tiny_server, "lorag-wrong").models.list()


def _metric(base_url: str, name: str) -> float:
    lines = httpx.get(f"{base_url}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name))


def test_client_disconnect_cancels_generation(tiny_server, corpus):
    messages = [{"role": "user", "content": PDF_QUESTION}]
    # Greedy decoding with this model never ends a turn (see endless_llama_path) ...
    probe = _openai(tiny_server, corpus.acme_key).chat.completions.create(
        model="lorag", messages=messages, max_tokens=64, temperature=0
    )
    assert probe.choices[0].finish_reason == "length"
    # ... so a 2000-token stream only ends early if the server cancels it when the client goes.
    tokens_before = _metric(tiny_server, "lorag_generated_tokens_total")
    payload = {"model": "lorag", "messages": messages, "max_tokens": 2000, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {corpus.acme_key}"}
    with httpx.stream("POST", f"{tiny_server}/v1/chat/completions", json=payload, headers=headers) as response:
        assert response.status_code == 200
        next(response.iter_lines())  # the role chunk: generation is running
    for _ in range(600):
        if _metric(tiny_server, "lorag_chat_in_flight") == 0:
            break
        time.sleep(0.1)
    assert _metric(tiny_server, "lorag_chat_in_flight") == 0  # the slot is free again
    assert _metric(tiny_server, "lorag_generated_tokens_total") == tokens_before  # no answer was finished


def test_client_leaving_a_non_streaming_request_cancels_generation(tiny_server, corpus):
    tokens_before = _metric(tiny_server, "lorag_generated_tokens_total")
    payload = {"model": "lorag", "messages": [{"role": "user", "content": PDF_QUESTION}], "max_tokens": 2000,
               "temperature": 0}
    headers = {"Authorization": f"Bearer {corpus.acme_key}"}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{tiny_server}/v1/chat/completions", json=payload, headers=headers, timeout=0.5)
    for _ in range(600):
        if _metric(tiny_server, "lorag_chat_in_flight") == 0:
            break
        time.sleep(0.1)
    assert _metric(tiny_server, "lorag_chat_in_flight") == 0
    assert _metric(tiny_server, "lorag_generated_tokens_total") == tokens_before


def test_extractive_citations_point_at_the_pdf_page(extractive_server, corpus):
    client = _openai(extractive_server, corpus.acme_key)
    completion = client.chat.completions.create(
        model="lorag", messages=[{"role": "user", "content": PDF_QUESTION}], max_tokens=200,
        extra_body={"retrieval": {"k": 4}},
    )
    extra = completion.model_extra
    assert extra["generator"] == "extractive"
    citations = extra["citations"]
    assert citations
    answer = completion.choices[0].message.content
    headers = {"Authorization": f"Bearer {corpus.acme_key}"}
    for citation in citations:
        assert f"[{citation['number']}]" in answer
        stored = httpx.get(f"{extractive_server}{citation['url']}", headers=headers).json()["passage"]
        assert stored["text"] == citation["text"] and stored["page"] == citation["page"]
    pdf_citations = [c for c in citations if c["source"].endswith("kestrel-tide-datasheet.pdf")]
    assert pdf_citations and all(c["page"] == 2 for c in pdf_citations if "0.1 mg/L" in c["text"])
    assert any("0.1 mg/L" in c["text"] for c in pdf_citations)

    chunks = list(client.chat.completions.create(  # the same request, streamed: the same citations
        model="lorag", messages=[{"role": "user", "content": PDF_QUESTION}], max_tokens=200,
        extra_body={"retrieval": {"k": 4}}, stream=True,
    ))
    streamed = chunks[-1].model_extra["citations"]
    assert [c["id"] for c in streamed] == [c["id"] for c in citations]


def test_extractive_through_langchain_keeps_citations(extractive_server, corpus):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=f"{extractive_server}/v1", api_key=corpus.beta_key, model="lorag", max_retries=0)
    message = chat.invoke("What is the beta launch code?")
    assert "7741" in message.content


def test_saturated_server_answers_503_in_openai_shape(corpus, tiny_llama_path):
    import openai

    from server.app import create_app
    from server.background import serving

    settings = server_settings(corpus, max_concurrent_requests=1, max_queued_requests=0)
    settings.generation.model = str(tiny_llama_path)
    settings.generation.fallback = "error"
    payload = {"model": "lorag", "messages": [{"role": "user", "content": PDF_QUESTION}], "max_tokens": 2000,
               "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {corpus.acme_key}"}
    with serving(create_app(settings, retrieval=corpus.retrieval)) as base_url:
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=payload, headers=headers) as held:
            lines = held.iter_lines()  # kept: a dropped iterator closes the connection, which frees the slot
            next(lines)  # this request holds the only slot while it streams
            with pytest.raises(openai.InternalServerError) as refused:  # another tenant: the whole is full
                _openai(base_url, corpus.beta_key).chat.completions.create(
                    model="lorag", messages=[{"role": "user", "content": "hi"}], max_tokens=4
                )
            assert refused.value.status_code == 503 and refused.value.code == "server_busy"
            assert int(refused.value.response.headers["Retry-After"]) >= 1
            assert _metric(base_url, "lorag_chat_rejected_total") == 1
        # The held stream is gone: the slot frees and the next request is served.
        for _ in range(600):
            if _metric(base_url, "lorag_chat_in_flight") == 0:
                break
            time.sleep(0.1)
        completion = _openai(base_url, corpus.acme_key).chat.completions.create(
            model="lorag", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert completion.choices[0].finish_reason in ("stop", "length")
