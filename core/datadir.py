"""Tenant names and where each tenant's state lives under the data directory, created owner-only.

Everything under ``<data_dir>/tenants`` is the tenants' own data: directories are made 0700 and files 0600, so
other local users can read none of it (as ``tenants.json``, which holds key hashes, already is).
"""

import os
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


def uploads_dir(data_dir: Path, tenant: str) -> Path:
    """The tenant's uploaded documents (the originals the index cites)."""
    return tenant_dir(data_dir, tenant) / "uploads"


def training_dir(data_dir: Path, tenant: str) -> Path:
    """The tenant's training runs (checkpoints, logs) before their adapter lands in the registry."""
    return tenant_dir(data_dir, tenant) / "training"


PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def make_private_dir(path: Path) -> Path:
    """Create ``path`` and any missing parents owner-only (0700, whatever the umask); returns ``path``.

    An existing directory keeps its mode, except ``path`` itself, which is tightened to 0700.
    """
    path = Path(path)
    missing = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=PRIVATE_DIR_MODE)
        except FileExistsError:  # made by a concurrent writer: tighten it all the same
            pass
        os.chmod(directory, PRIVATE_DIR_MODE)
    if path.is_dir() and path.stat().st_mode & 0o077:
        os.chmod(path, PRIVATE_DIR_MODE)
    return path


def make_private_file(path: Path) -> None:
    """Make an existing file owner-only (0600): for files a library writes with the umask's mode."""
    os.chmod(path, PRIVATE_FILE_MODE)
