"""The FastAPI app factory: ``create_app(settings)`` wires routes, limits, errors and metrics.

The lifespan builds what was not injected (RetrievalService, ``load_generator(settings.generation)``)
in a worker thread, so tests and embedders can pass their own instances.
"""

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from server.catalog import ModelCatalog
from server.chat_service import ChatService
from server.deps import Services
from server.error_handlers import install_error_handlers
from server.limits import BodyLimitMiddleware, ChatQueue
from server.metrics import Metrics, MetricsMiddleware
from server.routes import adapters, admin, chat, health, models, passages, retrieve, uploads, web
from server.settings import ServerSettings
from server.tenants import TenantRegistry

log = logging.getLogger(__name__)

DESCRIPTION = """\
Answers from each tenant's own documents with cited passages, behind an OpenAI-compatible API.

Authenticate with `Authorization: Bearer <key>`: a tenant key (`lorag tenant add NAME`) reaches only
that tenant's documents, passages, adapters and conversations. The admin key (`server.admin_key`,
env `LORAG_SERVER__ADMIN_KEY`) manages tenants under `/v1/admin` and can act as any tenant named in the
`X-Lorag-Tenant` header. Every error is an OpenAI error object `{"error": {"message", "type", "param", "code"}}`.
"""


def create_app(settings: ServerSettings, *, retrieval=None, generator=None) -> FastAPI:
    """Build the app. ``retrieval`` (a RetrievalService) and ``generator`` (a Generator) are built at
    start-up when not given; injected ones are not closed at shutdown (their owner closes them)."""
    metrics = Metrics()
    services = Services(settings=settings, registry=TenantRegistry(settings.data_dir), metrics=metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        own_generator = generator is None
        # Built here, not in create_app: an asyncio primitive belongs to the loop that serves the app.
        services.queue = ChatQueue(
            slots=settings.server.max_concurrent_requests, queue=settings.server.max_queued_requests, metrics=metrics
        )
        services.retrieval = retrieval if retrieval is not None else await run_in_threadpool(_load_retrieval, settings)
        services.generator = generator if generator is not None else await run_in_threadpool(_load_generator, settings)
        if own_generator:
            _announce(services.generator, settings)
        services.adapters = await run_in_threadpool(_start_adapters, settings, services.generator, metrics)
        services.catalog = ModelCatalog(
            settings.data_dir, base_name=served_model_name(settings, services.generator), adapters=services.adapters
        )
        services.chat = ChatService(
            settings, retrieval=services.retrieval, generator=services.generator, catalog=services.catalog,
            metrics=metrics, adapters=services.adapters,
        )
        try:
            yield
        finally:
            services.chat = None
            await run_in_threadpool(services.adapters.close)
            if own_generator:
                await services.generator.close()

    app = FastAPI(
        title="lorag",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=[
            {"name": "chat", "description": "OpenAI-compatible chat completions with citations"},
            {"name": "retrieval", "description": "search without generation"},
            {"name": "passages", "description": "cited passages in their document context"},
            {"name": "documents", "description": "the tenant's ingested documents"},
            {"name": "models", "description": "base model and the tenant's adapters"},
            {"name": "admin", "description": "tenant management (admin key)"},
            {"name": "health", "description": "liveness, readiness, Prometheus metrics"},
        ],
    )
    app.state.services = services
    install_error_handlers(app)
    for module in (chat, retrieve, passages, uploads, models, adapters, admin, health, web):
        app.include_router(module.router)
    # Outermost first at request time: metrics see every response, including 413s.
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.server.max_body_bytes, max_json_bytes=settings.server.max_json_bytes
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def served_model_name(settings: ServerSettings, generator) -> str:
    """The name /v1/models shows for the base model: configured, else the model id, else the generator's."""
    if settings.server.served_model_name:
        return settings.server.served_model_name
    if getattr(generator, "kind", None) == "generative" and settings.generation.model:
        return settings.generation.model
    return getattr(generator, "name", "lorag-base")


def _load_retrieval(settings: ServerSettings):
    from retrieval.service import RetrievalService

    return RetrievalService(settings)


def _load_generator(settings: ServerSettings):
    from server.generation.factory import load_generator

    # No embedder for the extractive fallback: embedding every candidate sentence costs seconds per request
    # on CPU (benchmarks/serve_load.py), and word overlap is enough to pick sentences to quote.
    return load_generator(settings.generation, adapters=settings.adapters)


def _start_adapters(settings: ServerSettings, generator, metrics: Metrics):
    from adapters.host import AdapterHost
    from server.hotswap.service import AdapterService

    host = generator if isinstance(generator, AdapterHost) else None
    service = AdapterService(settings, host=host, metrics=metrics)
    service.start()
    return service


def _announce(generator, settings: ServerSettings) -> None:
    if getattr(generator, "kind", None) == "extractive" and settings.generation.model:
        log.warning(
            "\n%s\nGENERATOR FELL BACK TO EXTRACTIVE ANSWERS: model %r was not loaded (see the error above).\n"
            "Answers quote the retrieved passages instead of being generated. Set LORAG_GENERATION__MODEL to a\n"
            "local model directory, or run with --generator extractive to silence this.\n%s",
            "=" * 78, settings.generation.model, "=" * 78,
        )
    else:
        log.info("generator: %s", getattr(generator, "name", generator))
