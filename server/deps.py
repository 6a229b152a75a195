"""FastAPI dependencies: the app's services, and who a request acts for (Bearer key -> tenant).

A tenant key acts as its own tenant only. The admin key acts as any tenant named in the
``X-Lorag-Tenant`` header, and alone may call ``/v1/admin/*``.
"""

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.errors import Forbidden, ServerBusy, Unauthorized
from server.services import Services
from server.settings import is_loopback
from server.tenants import Principal, Tenant, hash_key

TENANT_HEADER = "X-Lorag-Tenant"


def get_services(request: Request) -> Services:
    return request.app.state.services


def get_ready_services(request: Request) -> Services:
    services: Services = request.app.state.services
    if services.chat is None:
        raise ServerBusy("server is still starting: retrieval and generator are loading", hint="Retry shortly")
    return services


_bearer = HTTPBearer(auto_error=False, description="a tenant API key (`lorag tenant add`) or the admin key")


def get_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """Raises: Unauthorized (401) without a Bearer key or with an unknown one."""
    if credentials is None or not credentials.credentials:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    services = get_services(request)
    key = credentials.credentials
    admin_hash = services.settings.server.admin_hash()
    if admin_hash is not None and hmac.compare_digest(admin_hash, hash_key(key)):
        return Principal(tenant=None, is_admin=True)
    tenant = services.registry.authenticate(key)
    if tenant is None:
        raise Unauthorized("invalid API key", hint="Create one with `lorag tenant add NAME`")
    return Principal(tenant=tenant.id)


def get_tenant(
    request: Request,
    principal: Annotated[Principal, Depends(get_principal)],
    acting_as: Annotated[
        str | None, Header(alias=TENANT_HEADER, description="admin key only: the tenant to act as")
    ] = None,
) -> Tenant:
    """The tenant whose data this request may touch (and nothing else).

    Raises: Forbidden when a tenant key names another tenant or the admin names none; NotFound for an
    unknown tenant named by the admin.
    """
    registry = get_services(request).registry
    if principal.is_admin:
        if not acting_as:
            raise Forbidden(f"the admin key must name a tenant in the {TENANT_HEADER} header")
        tenant = registry.get(acting_as)
    else:
        if acting_as and acting_as != principal.tenant:
            raise Forbidden(f"this API key cannot act as tenant {acting_as!r}")
        tenant = registry.get(principal.tenant)
    request.state.tenant = tenant.id  # metrics label
    return tenant


def require_metrics_access(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Metrics carry every tenant's id and adapter names: with an admin key configured, only it may read them.

    Without one they stay open only on a server bound to loopback (``server.host``), so a local Prometheus needs
    no setup; a server reachable from other hosts refuses them until an admin key is set.
    Raises: Unauthorized without the key, Forbidden with any other key or without an admin key off loopback.
    """
    http = get_services(request).settings.server
    if http.admin_hash() is not None:
        require_admin(get_principal(request, credentials))
    elif not is_loopback(http.host):
        raise Forbidden(
            f"/metrics names every tenant and adapter, so a server on {http.host!r} without an admin key does not "
            "serve it", hint="set server.admin_key (env LORAG_SERVER__ADMIN_KEY) and scrape with that key",
        )


def require_admin(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    if not principal.is_admin:
        raise Forbidden("this endpoint needs the admin key (server.admin_key)")
    return principal


CurrentTenant = Annotated[Tenant, Depends(get_tenant)]
AdminPrincipal = Annotated[Principal, Depends(require_admin)]
ReadyServices = Annotated[Services, Depends(get_ready_services)]
AppServices = Annotated[Services, Depends(get_services)]
