"""Liveness and readiness (no auth, for orchestrators) and Prometheus metrics (the admin key, when one is set;
without one, only on a loopback host)."""

from fastapi import APIRouter, Depends, Response

from server.catalog import public_generator_name
from server.deps import AppServices, require_metrics_access
from server.metrics import CONTENT_TYPE
from server.schemas import HealthStatus, RemoteServerStatus

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthStatus)
def healthz(services: AppServices) -> HealthStatus:
    """The process answers HTTP (always 200, for liveness probes); the fields say what is loaded so far and, with
    remote generation, which vLLM servers answered last time."""
    generator = services.generator
    return HealthStatus(
        status="ok",
        generator=public_generator_name(getattr(generator, "name", None)),
        generator_kind=getattr(generator, "kind", None),
        retrieval=services.retrieval is not None,
        remote=_remote(services),
    )


@router.get("/readyz", response_model=HealthStatus, responses={503: {"model": HealthStatus}})
def readyz(services: AppServices, response: Response) -> HealthStatus:
    """Retrieval and the generator are loaded; 503 until then."""
    generator = services.generator
    ready = services.chat is not None
    remote = _remote(services)
    # Remote generation with every vLLM server down cannot answer: a load balancer should send traffic elsewhere.
    unavailable = ready and remote is not None and all(server.up is False for server in remote)
    if not ready or unavailable:
        response.status_code = 503
    return HealthStatus(
        status="unavailable" if unavailable else "ok" if ready else "starting",
        generator=public_generator_name(getattr(generator, "name", None)),
        generator_kind=getattr(generator, "kind", None),
        retrieval=services.retrieval is not None,
        remote=remote,
    )


def _remote(services) -> list[RemoteServerStatus] | None:
    states = getattr(services.generator, "remote_states", None)
    return None if states is None else [RemoteServerStatus(**state) for state in states()]


@router.get(
    "/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}},
    dependencies=[Depends(require_metrics_access)],
)
def metrics(services: AppServices) -> Response:
    """Prometheus text format: requests, latency, time to first token, retrieval time, tokens, per tenant and
    adapter. Needs ``Authorization: Bearer <admin key>`` when ``server.admin_key`` is set; without one it is
    served only when ``server.host`` is loopback (403 otherwise), since its labels name every tenant and adapter."""
    return Response(services.metrics.render(), media_type=CONTENT_TYPE)
