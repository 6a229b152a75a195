"""Which ``model`` names a tenant may ask for, and what each one means (base model or adapter).

Names: the base model's served name and the alias ``base`` mean the base model; ``lorag`` means the
tenant's default adapter when it has one, else the base model; any other name must be one of the
tenant's adapters (those the adapter service validated against the served model; for a generator that
cannot serve adapters, any directory with a ``lorag_adapter.json`` manifest under its adapters dir).
Each of these names with the suffix ``-no-rag`` is the same model answering without retrieval, for clients
that cannot send the ``retrieval`` field (Open WebUI's task model, plain chat).
"""

import logging
from dataclasses import dataclass
from pathlib import Path

from adapters.registry import AdapterRegistry
from adapters.validation import public_model_name
from server.errors import ModelNotFound
from server.schemas import ModelCard
from server.tenants import Tenant

BASE_ALIAS = "base"
DEFAULT_ALIAS = "lorag"
NO_RAG_SUFFIX = "-no-rag"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelChoice:
    name: str  # as the client asked
    adapter: str | None  # None = base model
    retrieval: bool = True  # False for the -no-rag aliases


class ModelCatalog:
    def __init__(self, data_dir: Path, *, base_name: str, adapters=None, base_aliases: tuple[str, ...] = ()):
        """``base_name`` is what /v1/models shows for the base model; ``base_aliases`` are other names a request
        may use for it without their being listed (the configured model, when it is a server path)."""
        self.registry = AdapterRegistry(data_dir)
        self.base_name = base_name
        self.base_names = {base_name, BASE_ALIAS, *base_aliases}
        self.adapter_service = adapters  # server.hotswap.service.AdapterService or None

    def adapters(self, tenant: str) -> list[str]:
        if self.adapter_service is not None:
            if self.adapter_service.host is not None:
                return self.adapter_service.names(tenant)  # validated against the served model
            return self.registry.names(tenant)
        return self.registry.names(tenant, with_manifest=True)

    def cards(self, tenant: Tenant) -> list[ModelCard]:
        cards = [
            ModelCard(id=self.base_name, owned_by="lorag", kind="base"),
            ModelCard(id=BASE_ALIAS, owned_by="lorag", kind="alias"),
            ModelCard(id=DEFAULT_ALIAS, owned_by="lorag", kind="alias"),
        ]
        cards += [ModelCard(id=name, owned_by=tenant.id, kind="adapter") for name in self.adapters(tenant.id)]
        return cards + [ModelCard(id=card.id + NO_RAG_SUFFIX, owned_by=card.owned_by, kind="alias") for card in cards]

    def resolve(self, name: str, tenant: Tenant) -> ModelChoice:
        """Raises: ModelNotFound (404) for a name that is neither the base model nor the tenant's adapter."""
        if name.endswith(NO_RAG_SUFFIX) and name not in self.adapters(tenant.id):
            try:
                model = self.resolve(name[: -len(NO_RAG_SUFFIX)], tenant)
            except ModelNotFound:
                raise _not_found(name) from None
            return ModelChoice(name, model.adapter, retrieval=False)
        if name in self.base_names:
            return ModelChoice(name, None)
        adapters = self.adapters(tenant.id)
        if name == DEFAULT_ALIAS:
            if tenant.default_adapter and tenant.default_adapter not in adapters:
                log.warning("tenant %r: default adapter %r is not in its adapters dir; using the base model",
                            tenant.id, tenant.default_adapter)
                return ModelChoice(name, None)
            return ModelChoice(name, tenant.default_adapter)
        if name in adapters:
            return ModelChoice(name, name)
        raise _not_found(name)


def _not_found(name: str) -> ModelNotFound:
    return ModelNotFound(
        f"The model {name!r} does not exist or you do not have access to it",
        hint="GET /v1/models lists the names this key may use",
    )


def public_generator_name(name: str | None) -> str | None:
    """A generator's name as clients see it (responses' ``generator``, /healthz, /readyz): the model part of
    "transformers:/srv/models/X" shown by its last path part only, so no server path leaves the server."""
    if name is None:
        return None
    kind, separator, model = name.partition(":")
    return f"{kind}{separator}{public_model_name(model)}" if separator else name
