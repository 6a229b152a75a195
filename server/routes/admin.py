"""Tenant administration over HTTP with the admin key (the same registry `lorag tenant` edits)."""

from typing import Annotated

from fastapi import APIRouter, Path, Query
from starlette.concurrency import run_in_threadpool

from server.deps import AdminPrincipal, AppServices
from server.schemas import ErrorResponse, TenantCreate, TenantKey, TenantList, TenantOut, TenantRemoved
from core.datadir import TENANT_NAME_PATTERN
from server.tenant_lifecycle import remove_tenant as remove_tenant_and_data
from server.tenants import Tenant

router = APIRouter(prefix="/v1/admin", tags=["admin"])
_ERRORS = {401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}, 404: {"model": ErrorResponse}}
TenantId = Annotated[str, Path(min_length=1, max_length=63, pattern=TENANT_NAME_PATTERN)]


def tenant_out(tenant: Tenant) -> TenantOut:
    return TenantOut(
        id=tenant.id, keys=len(tenant.key_hashes), default_adapter=tenant.default_adapter, created_at=tenant.created_at
    )


@router.get("/tenants", response_model=TenantList, responses=_ERRORS)
def list_tenants(admin: AdminPrincipal, services: AppServices) -> TenantList:
    return TenantList(data=[tenant_out(t) for t in services.registry.tenants()])


@router.post("/tenants", response_model=TenantKey, status_code=201, responses=_ERRORS | {409: {"model": ErrorResponse}})
async def add_tenant(body: TenantCreate, admin: AdminPrincipal, services: AppServices) -> TenantKey:
    """Create a tenant; the response holds its API key, shown only this once."""
    tenant, key = await run_in_threadpool(services.registry.add, body.id, default_adapter=body.default_adapter)
    return TenantKey(tenant=tenant_out(tenant), api_key=key)


@router.post("/tenants/{tenant_id}/rotate-key", response_model=TenantKey, responses=_ERRORS)
async def rotate_key(tenant_id: TenantId, admin: AdminPrincipal, services: AppServices) -> TenantKey:
    """Replace the tenant's keys with one new key (old keys stop working at once)."""
    key = await run_in_threadpool(services.registry.rotate_key, tenant_id)
    return TenantKey(tenant=tenant_out(services.registry.get(tenant_id)), api_key=key)


@router.delete("/tenants/{tenant_id}", response_model=TenantRemoved, responses=_ERRORS)
async def remove_tenant(
    tenant_id: TenantId,
    admin: AdminPrincipal,
    services: AppServices,
    purge: Annotated[bool, Query(description="delete the tenant's data instead of quarantining it")] = False,
) -> TenantRemoved:
    """Remove the tenant: its keys stop working and its data (index, uploads, adapters, training runs) moves to
    ``<data_dir>/quarantine``, or with ``purge=true`` is deleted. A tenant created later under the same id starts
    empty. ``purge=true`` also deletes data left on disk, or an index left in PostgreSQL, by a tenant no longer
    registered."""
    removed = await run_in_threadpool(
        remove_tenant_and_data, services.registry, services.settings, tenant_id, purge=purge)
    if services.adapters is not None:
        await run_in_threadpool(services.adapters.refresh)  # retire its adapters now, not at the next poll
    out = tenant_out(removed.tenant) if removed.tenant is not None else TenantOut(
        id=tenant_id, keys=0, default_adapter=None, created_at="")
    return TenantRemoved(**out.model_dump(), data=removed.data)
