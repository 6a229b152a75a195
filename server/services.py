"""The composition root: :func:`build_services` builds everything the server's routes use, once.

The app's lifespan (server.app), ``lorag eval``'s in-process backend (evaluation.backends) and the benchmarks
all build through here, so each runs the same retrieval, generator, adapter service, model catalog, chat
service and document uploads the server does. Anything passed in (a RetrievalService, a Generator, Metrics)
is used as is and never closed here: its owner closes it.

The heavy imports happen inside the functions, so importing this module (server.deps does) costs little.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from retrieval.service import RetrievalService
    from server.catalog import ModelCatalog
    from server.chat_service import ChatService
    from server.generation.protocol import Generator
    from server.hotswap.service import AdapterService
    from server.admission import Admission
    from server.metrics import Metrics
    from server.settings import ServerSettings
    from server.tenants import TenantStore
    from server.uploads import DocumentUploads

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Services:
    """Everything the routes use (``request.app.state.services``).

    ``settings``, ``registry`` and ``metrics`` exist from the start; the rest stays None until
    :func:`build_services` has built it, ``chat`` last: a Services whose ``chat`` is set is ready to serve.
    """

    settings: ServerSettings
    registry: TenantStore
    metrics: Metrics
    queue: Admission | None = None  # built by the app's lifespan, in the serving event loop; never here
    retrieval: RetrievalService | None = None
    generator: Generator | None = None
    adapters: AdapterService | None = None
    catalog: ModelCatalog | None = None
    uploads: DocumentUploads | None = None
    chat: ChatService | None = None
    owns_generator: bool = False  # built by build_services, so closed by close_services


def new_services(settings: ServerSettings, *, metrics: Metrics | None = None) -> Services:
    """A Services with its settings, tenant registry and metrics only (nothing loaded, not ready): the app holds
    it from the start and its lifespan fills it in with ``build_services(..., into=services)``."""
    from server.metrics import Metrics
    from server.tenants import open_tenant_registry

    return Services(settings=settings, registry=open_tenant_registry(settings), metrics=metrics or Metrics())


def new_admission(settings: ServerSettings, metrics: Metrics | None = None) -> Admission:
    """The chat admission ``settings.server`` describes. Call it in the event loop that serves the app."""
    import math

    from server.admission import Admission, RateLimits

    limits = settings.server

    def rate_limits(tenant: str) -> RateLimits:
        requests, tokens = limits.rate_limits(tenant)
        return RateLimits(requests_per_minute=requests, tokens_per_minute=tokens)

    return Admission(
        slots=limits.max_concurrent_requests, queue=limits.max_queued_requests,
        tenant_slots=max(1, math.ceil(limits.max_concurrent_requests * limits.tenant_concurrency_share)),
        tenant_queue=math.floor(limits.max_queued_requests * limits.tenant_queue_share),
        limits=rate_limits, metrics=metrics,
    )


def build_services(
    settings: ServerSettings,
    *,
    retrieval: RetrievalService | None = None,
    generator: Generator | None = None,
    metrics: Metrics | None = None,
    generate: bool = True,
    announce: bool = False,
    into: Services | None = None,
) -> Services:
    """Build what was not injected, in order: retrieval, document uploads, generator, adapter service, model
    catalog, chat service. Blocks for as long as a model takes to load: call it from a worker thread in a server.

    ``generate`` False builds retrieval and uploads only (no model, adapters, catalog or chat service).
    ``announce`` logs which generator now serves, loudly when a configured model fell back to extractive
    answers (``lorag serve`` does). ``into``: fill in this Services (the app's, which its routes already hold)
    instead of a new one; its registry and metrics are kept and ``metrics`` is ignored.
    The Admission is never built here: an asyncio primitive belongs to the loop that serves the app.

    Raises:
        LoragError: the model cannot be loaded and ``generation.fallback`` is "error".
    """
    services = into if into is not None else new_services(settings, metrics=metrics)
    services.retrieval = retrieval if retrieval is not None else _load_retrieval(settings)
    services.uploads = _document_uploads(settings, services.retrieval)
    if not generate:
        return services
    from server.attribution.attributor import Attributor
    from adapters.validation import public_model_name
    from server.catalog import ModelCatalog
    from server.chat_service import ChatService
    from server.generation.extractive import ExtractiveGenerator

    services.generator = generator if generator is not None else _load_generator(settings)
    services.owns_generator = generator is None
    if announce and services.owns_generator:
        _announce(services.generator, settings)
    if hasattr(services.generator, "remote_states"):
        from server.generation.remote_metrics import RemoteCollector

        services.metrics.registry.register(RemoteCollector(services.generator.pool))
    if hasattr(services.generator, "kv_cache_stats"):  # the multi-adapter engine
        services.metrics.watch_engine(services.generator.kv_cache_stats)
    services.adapters = _start_adapters(settings, services.generator, services.metrics)
    served = served_model_name(settings, services.generator)
    services.catalog = ModelCatalog(
        # /v1/models shows a model folder by its name: tenants never see server paths; requests may still name it
        settings.data_dir, base_name=public_model_name(served), base_aliases=(served,), adapters=services.adapters,
    )
    services.chat = ChatService(
        settings, retrieval=services.retrieval, generator=services.generator, catalog=services.catalog,
        metrics=services.metrics, adapters=services.adapters, admission=services.queue,
        # answer sentences are compared with passage windows in the space the index was built in
        attributor=Attributor(services.retrieval.embed_texts, settings.attribution),
        # word overlap, as the extractive fallback; its bar, attribution.quote_min_support, is measured with
        # benchmarks/answer_proof_sweep.py (benchmarks/RESULTS.md). The extractive fallback quotes for itself,
        # with its own measure and bar: a quoter with a lower bar would overrule its decline.
        quoter=services.generator if services.generator.kind == "extractive"
        else ExtractiveGenerator(min_support=settings.attribution.quote_min_support),
    )
    return services


async def close_services(services: Services) -> None:
    """Stop serving chat (``chat`` back to None), close the adapter service, then the generator when
    build_services loaded it (an injected one is its owner's to close). Retrieval needs no closing."""
    services.chat = None
    if services.adapters is not None:
        await asyncio.to_thread(services.adapters.close)
    if services.owns_generator and services.generator is not None:
        services.owns_generator = False
        await services.generator.close()


def served_model_name(settings: ServerSettings, generator) -> str:
    """The name /v1/models shows for the base model: configured, else the model id, else the generator's."""
    if settings.server.served_model_name:
        return settings.server.served_model_name
    if getattr(generator, "kind", None) == "generative" and settings.generation.model:
        from models.packaged import MODEL_NAME, packaged_model_dir
        from server.generation.factory import models_dir

        # The packaged model, whether configured ("packaged") or standing in for a model that did not load.
        served = generator.served_model().name if hasattr(generator, "served_model") else ""
        if served and Path(served).resolve() == packaged_model_dir(models_dir(settings.generation)).resolve():
            return MODEL_NAME
        return settings.generation.model
    return getattr(generator, "name", "lorag-base")


def _load_retrieval(settings: ServerSettings) -> RetrievalService:
    from retrieval.service import RetrievalService

    return RetrievalService(settings)


def _load_generator(settings: ServerSettings) -> Generator:
    from server.generation.factory import load_generator

    # No embedder for the extractive fallback: embedding every candidate sentence costs seconds per request
    # on CPU (benchmarks/serve_load.py), and word overlap is enough to pick sentences to quote.
    return load_generator(settings.generation, adapters=settings.adapters, data_dir=settings.data_dir)


def _start_adapters(settings: ServerSettings, generator, metrics: Metrics) -> AdapterService:
    from adapters.host import AdapterHost
    from server.hotswap.service import AdapterService

    host = generator if isinstance(generator, AdapterHost) else None
    service = AdapterService(settings, host=host, metrics=metrics)
    service.start()
    return service


def _document_uploads(settings: ServerSettings, retrieval: RetrievalService) -> DocumentUploads:
    from server.uploads import DocumentUploads

    return DocumentUploads(settings, retrieval)


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
