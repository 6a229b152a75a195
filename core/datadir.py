"""Tenant names and where each tenant's state lives under the data directory."""

import re
from pathlib import Path

from core.errors import LoragError

# Tenant names become directory names: allow only what is safe everywhere (no dots, no slashes).
TENANT_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"  # also the API document's pattern for tenant ids
_TENANT_NAME = re.compile(TENANT_NAME_PATTERN)


def validate_tenant_name(name: str) -> str:
    """Return ``name`` if it is a valid tenant name.

    Raises:
        LoragError: the name is empty, too long, or has characters other than a-z, 0-9, '-' and '_'.
    """
    if not _TENANT_NAME.fullmatch(name or ""):
        raise LoragError(
            f"invalid tenant name {name!r}",
            hint="Use 1-63 characters: lowercase letters, digits, '-' and '_', starting with a letter or digit",
        )
    return name


def tenant_dir(data_dir: Path, tenant: str) -> Path:
    """The directory holding all of one tenant's state: ``<data_dir>/tenants/<tenant>``."""
    return Path(data_dir) / "tenants" / validate_tenant_name(tenant)


def index_dir(data_dir: Path, tenant: str) -> Path:
    """Where the tenant's search index (vectors, chunk store, manifest) lives."""
    return tenant_dir(data_dir, tenant) / "index"


def adapters_dir(data_dir: Path, tenant: str) -> Path:
    """The tenant's adapter registry: one sub-directory per adapter, written by ``lorag train``."""
    return tenant_dir(data_dir, tenant) / "adapters"
