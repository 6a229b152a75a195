"""Removing a tenant and what becomes of its data: a re-created tenant id never inherits anything.

Removing a tenant takes it out of the registry (its keys stop working) and then, in the same call, moves its whole
data directory (index, uploads, adapters, training runs) out of ``<data_dir>/tenants`` into
``<data_dir>/quarantine/<tenant>-<UTC time>``, where nothing serves it and an operator can still restore or delete
it; with ``purge`` the data is deleted instead. The admin route (``DELETE /v1/admin/tenants/{id}[?purge=true]``)
and ``lorag tenant remove NAME [--purge]`` both come here.
"""

import logging
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from core.atomic import fsync_path
from core.datadir import make_private_dir, tenant_dir, validate_tenant_name
from core.errors import NotFound

log = logging.getLogger(__name__)

QUARANTINE_DIR = "quarantine"


@dataclass(frozen=True)
class RemovedTenant:
    id: str
    tenant: object | None  # the registry entry removed, None when only leftover data was purged
    data: Literal["quarantined", "purged", "none"]
    quarantined_to: Path | None = None


def quarantine_dir(data_dir: Path) -> Path:
    """Where removed tenants' data waits (outside ``tenants/``, so no index, adapter scan or upload reaches it)."""
    return Path(data_dir) / QUARANTINE_DIR


def remove_tenant(registry, settings, tenant_id: str, *, purge: bool = False) -> RemovedTenant:
    """Remove ``tenant_id`` from ``registry`` and quarantine (or with ``purge`` delete) its data directory under
    ``settings.data_dir`` (the process's settings).

    With ``purge``, a tenant no longer in the registry whose data is still there (left by an older lorag,
    ingested without ever being registered, or an index left in PostgreSQL) has that data deleted too.

    With ``retrieval.store`` in PostgreSQL, the tenant's index there is deleted or renamed to a quarantine name
    as well (``retrieval.tenant_indexes.retire_index``): a tenant created later under the id starts empty.

    Raises:
        NotFound: the tenant is neither registered nor has data (or, without ``purge``, is not registered).
        LoragError: an invalid tenant name.
    """
    from retrieval.tenant_indexes import index_exists, retire_index

    validate_tenant_name(tenant_id)
    data_dir = settings.data_dir
    source = tenant_dir(data_dir, tenant_id)
    try:
        removed = registry.remove(tenant_id)
    except NotFound:
        if not (purge and (source.exists() or index_exists(settings, tenant_id))):
            raise
        removed = None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    retired = retire_index(settings, tenant_id, purge=purge, stamp=stamp)
    if retired is not None:
        log.warning("tenant %s removed; its PostgreSQL index was %s", tenant_id,
                    "deleted" if retired == "purged" else f"renamed {retired!r}")
    if not source.exists():
        return RemovedTenant(tenant_id, removed, "none" if retired is None else "purged" if purge else "quarantined")
    if purge:
        _purge(data_dir, source)
        log.warning("tenant %s removed; its data was deleted", tenant_id)
        return RemovedTenant(tenant_id, removed, "purged")
    target = make_private_dir(quarantine_dir(data_dir)) / f"{tenant_id}-{stamp}"
    os.rename(source, target)  # one step: readers see the tenant's data whole or not at all
    fsync_path(source.parent)
    log.warning("tenant %s removed; its data was moved to %s", tenant_id, target)
    return RemovedTenant(tenant_id, removed, "quarantined", target)


def _purge(data_dir: Path, source: Path) -> None:
    # Renamed away first, so a crash part-way through leaves no half-deleted tenant where a new one would find it.
    doomed = make_private_dir(quarantine_dir(data_dir)) / f".purging-{source.name}-{os.getpid()}"
    os.rename(source, doomed)
    fsync_path(source.parent)
    shutil.rmtree(doomed)
