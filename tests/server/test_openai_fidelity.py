"""OpenAI's chat fields as OpenAI and vLLM treat them: what lorag does not implement is refused by name,
the developer role is a system turn, tool turns get a clear message, defaults follow OpenAI's rules or a
documented setting, and the -no-rag aliases and task prompts answer without documents."""

import pytest

from tests.server.conftest import assert_error, auth, server_settings

QUESTION = "What is the accuracy of the dissolved oxygen sensor?"
TITLE_PROMPT = (  # the shape of Open WebUI's default title-generation prompt
    "### Task:\nGenerate a concise, 3-5 word title with an emoji summarizing the chat history.\n"
    "### Guidelines:\n- The title should clearly represent the main theme or subject of the conversation.\n"
    '### Output:\nJSON format: { "title": "your concise title here" }\n'
    f"### Chat History:\n<chat_history>\nUSER: {QUESTION}\nASSISTANT: It is accurate to 0.1 mg/L [1].\n"
    "</chat_history>"
)
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}


def _chat(client, key, **body):
    payload = {"model": "lorag", "messages": [{"role": "user", "content": QUESTION}], **body}
    return client.post("/v1/chat/completions", json=payload, headers=auth(key))


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [TOOL]}, "tools"),
        ({"tools": [TOOL], "tool_choice": "required"}, "tools"),
        ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
        ({"functions": [TOOL["function"]]}, "functions"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),  # the extractive generator samples no tokens
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"modalities": ["text", "audio"]}, "modalities"),
    ],
)
def test_unimplemented_fields_are_refused_by_name(client, corpus, body, param):
    error = assert_error(_chat(client, corpus.acme_key, **body), 400, error_type="invalid_request_error", param=param)
    assert param in error["message"]


@pytest.mark.parametrize(
    "body",
    [{"tools": []}, {"tools": [TOOL], "tool_choice": "none"}, {"response_format": {"type": "text"}}, {"n": 1},
     {"logprobs": False}, {"presence_penalty": 0}, {"modalities": ["text"]}, {"parallel_tool_calls": False}],
)
def test_fields_that_ask_for_nothing_pass(client, corpus, body):
    response = _chat(client, corpus.acme_key, **body)
    assert response.status_code == 200, response.text
    assert response.json()["citations"]


def test_developer_role_is_a_system_turn(client, corpus):
    messages = [{"role": "developer", "content": "Answer in one sentence."}, {"role": "user", "content": QUESTION}]
    response = _chat(client, corpus.acme_key, messages=messages)
    assert response.status_code == 200, response.text
    assert response.json()["citations"]


def test_tool_turns_get_a_clear_message(client, corpus):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {"role": "user", "content": QUESTION}]
    error = assert_error(_chat(client, corpus.acme_key, messages=messages), 400, param="messages.1.tool_calls")
    assert "does not call tools" in error["message"]
    error = assert_error(_chat(client, corpus.acme_key, messages=messages[2:]), 400, param="messages.0.role")
    assert "'tool'" in error["message"] and "does not call tools" in error["message"]


def test_extractive_usage_counts_prompt_and_completion_tokens(client, corpus):
    usage = _chat(client, corpus.acme_key).json()["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_temperature_defaults_to_the_documented_setting(corpus, extractive_generator):
    from server.chat_service import ChatService
    from server.schemas import ChatRequest

    settings = server_settings(corpus)
    settings.generation.temperature = 0.7
    service = ChatService(settings, retrieval=None, generator=extractive_generator, catalog=None, metrics=None)
    request = {"model": "lorag", "messages": [{"role": "user", "content": QUESTION}]}
    assert service._sampling(ChatRequest(**request)).temperature == 0.7
    assert service._sampling(ChatRequest(**request, temperature=0)).temperature == 0
    assert service._sampling(ChatRequest(**request)).max_tokens is None  # no cap unless server.default_max_tokens


@pytest.fixture(scope="module")
def endless_client(corpus, endless_llama_path):
    """The tiny Llama that never ends a turn, in a 600-token context: only the context stops its answers."""
    from fastapi.testclient import TestClient

    from server.app import create_app

    settings = server_settings(corpus)
    settings.generation.model = str(endless_llama_path)
    settings.generation.fallback = "error"
    settings.generation.max_context_tokens = 600
    with TestClient(create_app(settings, retrieval=corpus.retrieval)) as client:
        yield client


def test_without_max_tokens_the_answer_runs_to_the_context_limit(endless_client, corpus):
    body = _chat(endless_client, corpus.acme_key, retrieval={"enabled": False}).json()
    usage = body["usage"]
    assert body["choices"][0]["finish_reason"] == "length"
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 600
    assert usage["completion_tokens"] > 256  # the old silent default


def test_a_server_cap_applies_to_requests_without_max_tokens(corpus, endless_llama_path):
    from fastapi.testclient import TestClient

    from server.app import create_app

    settings = server_settings(corpus, default_max_tokens=7)
    settings.generation.model = str(endless_llama_path)
    settings.generation.fallback = "error"
    with TestClient(create_app(settings, retrieval=corpus.retrieval)) as client:
        body = _chat(client, corpus.acme_key, retrieval={"attribution": False}).json()
        assert body["usage"]["completion_tokens"] == 7 and body["choices"][0]["finish_reason"] == "length"
        body = _chat(client, corpus.acme_key, max_tokens=3, retrieval={"attribution": False}).json()
        assert body["usage"]["completion_tokens"] == 3


def test_no_rag_aliases_are_listed_and_answer_without_documents(client, corpus):
    ids = {card["id"] for card in client.get("/v1/models", headers=auth(corpus.acme_key)).json()["data"]}
    assert {"lorag-no-rag", "base-no-rag"} <= ids
    body = _chat(client, corpus.acme_key, model="lorag-no-rag").json()
    assert body["model"] == "lorag-no-rag" and body["citations"] == [] and body["context"] == []
    assert body["attribution"] is None
    assert_error(_chat(client, corpus.acme_key, model="gpt-4-no-rag"), 404, param="model")


def test_a_client_task_prompt_is_not_answered_from_documents(client, corpus):
    body = _chat(client, corpus.acme_key, messages=[{"role": "user", "content": TITLE_PROMPT}]).json()
    assert body["citations"] == [] and body["context"] == []


def test_sources_are_appended_to_the_content_when_asked(client, corpus):
    body = _chat(client, corpus.acme_key, sources_in_content=True).json()
    content = body["choices"][0]["message"]["content"]
    answer, sources = content.split("\n\n**Sources**\n\n")
    assert body["attribution"]["text"] == answer
    lines = sources.splitlines()
    assert len(lines) == len(body["citations"])
    for line, citation in zip(lines, body["citations"]):
        assert line == (f"- **[{citation['number']}]** [{citation['source']}, page {citation['page']}]"
                        f"({citation['url']})")
    plain = _chat(client, corpus.acme_key).json()["choices"][0]["message"]["content"]
    assert "**Sources**" not in plain


def test_server_setting_appends_sources_to_streams_too(corpus, extractive_generator):
    import json

    from fastapi.testclient import TestClient

    from server.app import create_app

    settings = server_settings(corpus, sources_in_content=True, public_url="https://docs.example.com/")
    with TestClient(create_app(settings, retrieval=corpus.retrieval, generator=extractive_generator)) as client:
        response = _chat(client, corpus.acme_key, stream=True)
        events = [line[len("data: "):] for line in response.text.split("\n\n") if line.startswith("data: ")]
        chunks = [json.loads(event) for event in events[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        final = chunks[-1]
        assert final["citations"] and "\n\n**Sources**\n\n" in text
        first = final["citations"][0]
        assert f"(https://docs.example.com{first['url']})" in text
        body = _chat(client, corpus.acme_key, sources_in_content=False).json()
        assert "**Sources**" not in body["choices"][0]["message"]["content"]


def test_text_completions_answer_the_prompt_with_citations(client, corpus):
    response = client.post("/v1/completions", json={"model": "lorag", "prompt": QUESTION}, headers=auth(corpus.acme_key))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    choice = body["choices"][0]
    assert choice["finish_reason"] in ("stop", "length") and choice["logprobs"] is None
    assert body["citations"] and all(f"[{c['number']}]" in choice["text"] for c in body["citations"])
    assert any("0.1 mg/L" in c["text"] for c in body["citations"])
    assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["completion_tokens"] > 0


def test_text_completions_stream_in_openai_shape(client, corpus):
    import json

    response = client.post("/v1/completions", json={"model": "lorag", "prompt": [QUESTION], "stream": True},
                           headers=auth(corpus.acme_key))
    events = [line[len("data: "):] for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(c["object"] == "text_completion" and "text" in c["choices"][0] for c in chunks)
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert chunks[-1]["citations"] and chunks[-1]["choices"][0]["finish_reason"]
    assert all(f"[{c['number']}]" in text for c in chunks[-1]["citations"])


@pytest.mark.parametrize(
    ("body", "param"),
    [({"prompt": ["one", "two"]}, "prompt"), ({"prompt": [1, 2, 3]}, "prompt"), ({"echo": True}, "echo"),
     ({"logprobs": 2}, "logprobs"), ({"suffix": "end"}, "suffix"), ({"best_of": 2}, "best_of"), ({"n": 3}, "n")],
)
def test_text_completion_fields_lorag_does_not_implement_are_refused(client, corpus, body, param):
    payload = {"model": "lorag", "prompt": QUESTION, **body}
    response = client.post("/v1/completions", json=payload, headers=auth(corpus.acme_key))
    assert_error(response, 400, error_type="invalid_request_error", param=param)


def test_logprobs_from_the_transformers_generator(endless_client, corpus):
    import json

    body = _chat(endless_client, corpus.acme_key, max_tokens=6, logprobs=True, top_logprobs=3,
                 retrieval={"enabled": False}).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] == 6
    for entry in content:
        top = entry["top_logprobs"]
        assert len(top) == 3 and [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert entry["logprob"] <= 0 and entry["bytes"] == list(entry["token"].encode("utf-8"))
        # greedy: the chosen token is the most likely one of the distribution reported
        assert (entry["token"], entry["logprob"]) == (top[0]["token"], top[0]["logprob"])
    plain = _chat(endless_client, corpus.acme_key, max_tokens=6, retrieval={"enabled": False}).json()
    assert plain["choices"][0]["logprobs"] is None

    response = _chat(endless_client, corpus.acme_key, max_tokens=6, logprobs=True, stream=True,
                     retrieval={"enabled": False})
    chunks = [json.loads(line[len("data: "):]) for line in response.text.split("\n\n")
              if line.startswith("data: ") and line != "data: [DONE]"]
    streamed = [e for c in chunks for e in (c["choices"][0].get("logprobs") or {}).get("content", [])]
    assert [e["token"] for e in streamed] == [e["token"] for e in content]
