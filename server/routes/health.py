"""Liveness, readiness and Prometheus metrics (no auth: keep the port private or scrape via a proxy)."""

from fastapi import APIRouter, Response

from server.deps import AppServices
from server.metrics import CONTENT_TYPE
from server.schemas import HealthStatus

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthStatus)
def healthz() -> HealthStatus:
    """The process answers HTTP."""
    return HealthStatus(status="ok")


@router.get("/readyz", response_model=HealthStatus, responses={503: {"model": HealthStatus}})
def readyz(services: AppServices, response: Response) -> HealthStatus:
    """Retrieval and the generator are loaded; 503 until then."""
    generator = services.generator
    ready = services.chat is not None
    if not ready:
        response.status_code = 503
    return HealthStatus(
        status="ok" if ready else "starting",
        generator=getattr(generator, "name", None),
        generator_kind=getattr(generator, "kind", None),
        retrieval=services.retrieval is not None,
    )


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics(services: AppServices) -> Response:
    """Prometheus text format: requests, latency, time to first token, retrieval time, tokens, per tenant."""
    return Response(services.metrics.render(), media_type=CONTENT_TYPE)
