"""GET /v1/models: the base model, its aliases and the adapters this tenant may use (OpenAI list shape)."""

from fastapi import APIRouter

from server.deps import CurrentTenant, ReadyServices
from server.schemas import ErrorResponse, ModelCard, ModelList

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelList, responses={401: {"model": ErrorResponse}})
def list_models(tenant: CurrentTenant, services: ReadyServices) -> ModelList:
    return ModelList(data=services.catalog.cards(tenant))


@router.get("/v1/models/{model:path}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
def get_model(model: str, tenant: CurrentTenant, services: ReadyServices) -> ModelCard:
    services.catalog.resolve(model, tenant)  # raises model_not_found for names this tenant cannot use
    return next(card for card in services.catalog.cards(tenant) if card.id == model)
