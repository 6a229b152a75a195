"""Where ``lorag eval`` gets answers and passages: the server's chat service in-process, or a running server.

Both return the same :class:`Reply` (answer text, cited passages, uncited context), so every metric is
computed from what users get. The model is chosen by name (``base`` or an adapter), retrieval by
``retrieval.enabled``, exactly as a client would ask.
"""

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Literal

from core.errors import LoragError

log = logging.getLogger(__name__)

BASE_MODEL = "base"  # the catalog's alias of the served base model


@dataclass(frozen=True)
class PassageRef:
    """A passage as the API returns it (server.schemas.PassageOut / CitationOut)."""

    id: str
    source: str
    page: int
    start: int
    end: int
    text: str
    number: int | None = None  # the [n] the answer used, for citations

    @classmethod
    def from_dict(cls, data: dict) -> "PassageRef":
        return cls(data["id"], data["source"], int(data["page"]), int(data["start"]), int(data["end"]), data["text"],
                   data.get("number"))

    def as_dict(self) -> dict:
        return {"id": self.id, "source": self.source, "page": self.page, "start": self.start, "end": self.end,
                "text": self.text, "number": self.number}


@dataclass
class Reply:
    text: str
    citations: list[PassageRef] = field(default_factory=list)
    context: list[PassageRef] = field(default_factory=list)
    generator: str = ""
    error: str | None = None  # the request failed; text is empty
    error_kind: Literal["error", "timeout"] | None = None


class InProcessBackend:
    """The app's services built in this process (server.services.build_services, as the app's lifespan builds
    them) for one tenant."""

    def __init__(self, settings, *, tenant: str, retrieval=None, generator=None, generate: bool = True):
        from server.services import build_services
        from server.tenants import Tenant

        self.description = f"in-process, tenant {tenant!r}"
        self._loop = asyncio.new_event_loop()
        self.services = build_services(settings, retrieval=retrieval, generator=generator, generate=generate)
        self.retrieval = self.services.retrieval
        registry = self.services.registry
        known = {t.id: t for t in registry.tenants()} if registry.path.is_file() else {}
        self.tenant = known.get(tenant) or Tenant(id=tenant)  # evaluation needs no API key
        self.generator = self.services.generator
        self.chat_service = self.services.chat
        self.catalog = self.services.catalog
        self.generator_name = getattr(self.generator, "name", "")

    def adapters(self) -> list[str]:
        return self.catalog.adapters(self.tenant.id)

    def retrieve(self, query: str, *, k: int, mode: str) -> list[PassageRef]:
        from server.schemas import PassageOut

        passages = self.retrieval.retrieve(self.tenant.id, query, k=k, mode=mode)
        return [PassageRef.from_dict(PassageOut.from_passage(p).model_dump()) for p in passages]

    def chat(self, question: str, *, model: str, retrieval: bool, k: int | None, max_tokens: int,
             attribution: bool | None = None) -> Reply:
        from server.errors import RequestTimeout
        from server.schemas import ChatRequest

        body = ChatRequest(model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
                           temperature=0.0, retrieval={"enabled": retrieval, "k": k, "attribution": attribution})

        async def answer():
            prepared = await self.chat_service.prepare(body, self.tenant)
            return await self.chat_service.complete(prepared)

        try:
            response = self._loop.run_until_complete(answer())
        except RequestTimeout as error:
            return Reply("", error=str(error), error_kind="timeout")
        except LoragError as error:
            return Reply("", error=str(error), error_kind="error")
        data = response.model_dump()
        return _reply(data)

    def close(self) -> None:
        from server.services import close_services

        self._loop.run_until_complete(close_services(self.services))
        self._loop.close()


class HttpBackend:
    """A running lorag server through the official openai client (chat) and ``POST /v1/retrieve``."""

    def __init__(self, url: str, api_key: str, *, timeout: float = 300.0):
        import httpx
        from openai import OpenAI

        root = url.rstrip("/").removesuffix("/v1")
        self.description = f"server {root}"
        # No client retries: a failed or timed-out request is a result to record, not to hide.
        self.client = OpenAI(base_url=root + "/v1", api_key=api_key, timeout=timeout, max_retries=0)
        self.http = httpx.Client(base_url=root, headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout)
        self.generator_name = ""
        try:
            response = self.http.get("/v1/models")
        except httpx.HTTPError as error:
            raise LoragError(f"cannot reach the lorag server at {root!r}: {error}",
                             hint="Start it with `lorag serve` or fix --server") from error
        if response.status_code == 401:
            raise LoragError(f"the server at {root!r} refused --api-key (401)", hint="Use a tenant key from `lorag tenant add`")
        response.raise_for_status()
        self._models = response.json()["data"]

    def adapters(self) -> list[str]:
        return [card["id"] for card in self._models if card.get("kind") == "adapter"]

    def retrieve(self, query: str, *, k: int, mode: str) -> list[PassageRef]:
        response = self.http.post("/v1/retrieve", json={"query": query, "k": k, "mode": mode})
        if response.status_code != 200:
            raise LoragError(f"POST /v1/retrieve for {query[:60]!r} failed ({response.status_code}): {response.text[:300]}")
        return [PassageRef.from_dict(p) for p in response.json()["data"]]

    def chat(self, question: str, *, model: str, retrieval: bool, k: int | None, max_tokens: int,
             attribution: bool | None = None) -> Reply:
        import openai

        options = {"enabled": retrieval} | ({"k": k} if k is not None else {})
        if attribution is not None:
            options["attribution"] = attribution
        try:
            completion = self.client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
                temperature=0.0, extra_body={"retrieval": options},
            )
        except openai.APITimeoutError as error:
            return Reply("", error=f"timed out: {error}", error_kind="timeout")
        except openai.APIStatusError as error:
            kind = "timeout" if error.status_code == 504 else "error"
            return Reply("", error=f"{error.status_code}: {error.message}", error_kind=kind)
        except openai.APIConnectionError as error:
            return Reply("", error=f"connection failed: {error}", error_kind="error")
        reply = _reply(completion.model_dump())  # lorag's extra fields (citations, context) are kept
        self.generator_name = reply.generator or self.generator_name
        return reply

    def close(self) -> None:
        self.http.close()
        self.client.close()


def _reply(data: dict) -> Reply:
    return Reply(
        text=data["choices"][0]["message"]["content"] or "",
        citations=[PassageRef.from_dict(c) for c in data.get("citations") or []],
        context=[PassageRef.from_dict(c) for c in data.get("context") or []],
        generator=data.get("generator") or "",
    )
