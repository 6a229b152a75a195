"""The clients people already run, against a real uvicorn server: LangChain with citations (ChatLorag),
the openai SDK's text completions (what LlamaIndex's OpenAILike calls by default) and an Open WebUI-shaped
session (models list, streamed chat with a Sources list, title and tag generation answered without documents)."""

import json

import httpx
import pytest

from tests.server.conftest import server_settings
from tests.server.test_openai_fidelity import QUESTION, TITLE_PROMPT

pytestmark = pytest.mark.slow

TAGS_PROMPT = (  # the shape of Open WebUI's default tag-generation prompt
    "### Task:\nGenerate 1-3 broad tags categorizing the main themes of the chat history, along with 1-3 more "
    'specific subtopic tags.\n### Output:\nJSON format: { "tags": ["tag1", "tag2", "tag3"] }\n'
    f"### Chat History:\n<chat_history>\nUSER: {QUESTION}\n</chat_history>"
)


@pytest.fixture(scope="module")
def server(corpus, extractive_generator):
    from server.app import create_app
    from server.background import serving

    app = create_app(server_settings(corpus), retrieval=corpus.retrieval, generator=extractive_generator)
    with serving(app) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def webui_server(corpus, extractive_generator):
    """Set up as an Open WebUI backend: sources in the content, since Open WebUI shows only that."""
    from server.app import create_app
    from server.background import serving

    app = create_app(server_settings(corpus, sources_in_content=True), retrieval=corpus.retrieval,
                     generator=extractive_generator)
    with serving(app) as base_url:
        yield base_url


def test_langchain_chat_lorag_exposes_citations(server, corpus):
    from lorag.langchain_chat import ChatLorag

    chat = ChatLorag(base_url=f"{server}/v1", api_key=corpus.acme_key, model="lorag", max_retries=0)
    message = chat.invoke(QUESTION)
    citations = message.response_metadata["citations"]
    assert citations and all(f"[{c['number']}]" in message.content for c in citations)
    assert any("0.1 mg/L" in c["text"] for c in citations)
    assert message.response_metadata["generator"] == "extractive"

    streamed = None
    for chunk in chat.stream(QUESTION):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed.response_metadata["citations"]
    assert [c["number"] for c in streamed.response_metadata["citations"]] == [c["number"] for c in citations]

    with_sources = ChatLorag(base_url=f"{server}/v1", api_key=corpus.acme_key, model="lorag", max_retries=0,
                             extra_body={"sources_in_content": True, "retrieval": {"k": 3}})
    assert "**Sources**" in with_sources.invoke(QUESTION).content


def test_openai_sdk_text_completions(server, corpus):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key=corpus.acme_key, max_retries=0)
    completion = client.completions.create(model="lorag", prompt=QUESTION)
    assert completion.object == "text_completion"
    assert completion.model_extra["citations"] and "[1]" in completion.choices[0].text
    streamed = "".join(chunk.choices[0].text for chunk in
                       client.completions.create(model="lorag", prompt=QUESTION, stream=True) if chunk.choices)
    assert "[1]" in streamed


def test_an_open_webui_session(webui_server, corpus):
    headers = {"Authorization": f"Bearer {corpus.acme_key}", "Content-Type": "application/json"}
    with httpx.Client(base_url=f"{webui_server}/v1", headers=headers, timeout=60) as http:
        models = http.get("/models").json()["data"]
        assert {"lorag", "lorag-no-rag"} <= {model["id"] for model in models}

        chat = {"model": "lorag", "stream": True, "messages": [{"role": "user", "content": QUESTION}],
                "stream_options": {"include_usage": True}}
        with http.stream("POST", "/chat/completions", json=chat) as response:
            assert response.status_code == 200
            events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in events[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        answer, sources = text.split("\n\n**Sources**\n\n")
        assert "[1]" in answer and "- **[1]** [" in sources and "/v1/passages/" in sources
        assert chunks[-1]["usage"]["total_tokens"] > 0

        history = chat["messages"] + [{"role": "assistant", "content": text}]
        for prompt in (TITLE_PROMPT, TAGS_PROMPT):
            task = {"model": "lorag", "stream": False, "max_completion_tokens": 1000,
                    "messages": [*history, {"role": "user", "content": prompt}]}
            body = http.post("/chat/completions", json=task).json()
            assert body["citations"] == [] and body["context"] == [], body
            assert "**Sources**" not in body["choices"][0]["message"]["content"]

        # the documented switch for a client that cannot send extra fields: the -no-rag alias
        body = http.post("/chat/completions", json={"model": "lorag-no-rag", "messages": chat["messages"]}).json()
        assert body["context"] == [] and body["citations"] == []


def test_langchain_bind_tools_is_refused_not_ignored(server, corpus):
    import openai
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def pump_weight(model: str) -> str:
        """Look up a pump's weight."""
        return "12 kg"

    chat = ChatOpenAI(base_url=f"{server}/v1", api_key=corpus.acme_key, model="lorag", max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        chat.bind_tools([pump_weight]).invoke(QUESTION)
    assert refused.value.body["param"] == "tools" and "does not call tools" in refused.value.body["message"]
