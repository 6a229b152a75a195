"""The FastAPI app factory: ``create_app(settings)`` wires routes, limits, errors and metrics.

The lifespan builds the services through server.services.build_services (what was not injected: the
RetrievalService, the generator from ``settings.generation``) in a worker thread, so tests and embedders can
pass their own instances.
"""

from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from server.error_handlers import install_error_handlers
from server.limits import BodyLimitMiddleware
from server.openapi import install_openapi
from server.request_log import RequestLogMiddleware
from server.routes import adapters, admin, chat, health, models, passages, retrieve, uploads, web
from server.routes.docs import install_docs
from server.services import build_services, close_services, new_admission, new_services
from server.settings import ServerSettings

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
    services = new_services(settings)
    metrics = services.metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Built here, not in create_app: an asyncio primitive belongs to the loop that serves the app.
        services.queue = new_admission(settings, metrics)
        await run_in_threadpool(
            partial(build_services, settings, retrieval=retrieval, generator=generator, announce=True, into=services)
        )
        try:
            yield
        finally:
            await close_services(services)

    app = FastAPI(
        title="lorag",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served by install_docs from local assets, not from a CDN
        redoc_url=None,
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
    routers = [module.router for module in (chat, retrieve, passages, uploads, models, adapters, admin, health, web)]
    for router in routers:
        app.include_router(router)
    install_openapi(app, routers, max_k=settings.server.max_k)
    install_docs(app)
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.server.max_body_bytes, max_json_bytes=settings.server.max_json_bytes
    )
    # Outermost: its X-Request-ID, log line and metrics cover every response, 413s included.
    app.add_middleware(RequestLogMiddleware, metrics=metrics)
    return app

