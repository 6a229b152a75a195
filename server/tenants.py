"""The tenant registry (``<data_dir>/tenants.json``) and API-key authentication.

Keys are random 256-bit tokens shown once; only their sha256 is stored and compared in constant time.
The CLI edits the file under a lock with atomic writes; the server re-reads it when it changes.
"""

import fcntl
import hashlib
import hmac
import json
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from core.atomic import write_atomically
from core.errors import Conflict, LoragError, NotFound
from core.datadir import validate_tenant_name
from adapters.registry import validate_adapter_name

FORMAT_VERSION = 1
KEY_PREFIX = "lorag-"


@dataclass(frozen=True)
class Tenant:
    id: str
    key_hashes: tuple[str, ...] = ()
    default_adapter: str | None = None
    created_at: str = ""


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: a tenant, or the admin (who names a tenant explicitly to act as it)."""

    tenant: str | None
    is_admin: bool = False


@dataclass
class _Snapshot:
    mtime_ns: int = -1
    tenants: dict[str, Tenant] = field(default_factory=dict)


def hash_key(key: str) -> str:
    """sha256 hex of an API key; keys are high-entropy, so no salt or slow hash is needed."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class TenantRegistry:
    """Reads and edits ``tenants.json``; safe across processes (file lock) and threads."""

    def __init__(self, data_dir: Path):
        self.path = Path(data_dir) / "tenants.json"
        self._lock_path = Path(data_dir) / "tenants.json.lock"
        self._snapshot = _Snapshot()
        self._thread_lock = threading.Lock()

    # -- reading -------------------------------------------------------------------------------
    def tenants(self) -> list[Tenant]:
        return sorted(self._current().values(), key=lambda tenant: tenant.id)

    def get(self, tenant_id: str) -> Tenant:
        """Raises: NotFound when no tenant has that id."""
        tenant = self._current().get(tenant_id)
        if tenant is None:
            raise NotFound(f"tenant {tenant_id!r} does not exist", hint="List tenants with `lorag tenant list`")
        return tenant

    def authenticate(self, key: str) -> Tenant | None:
        """The tenant owning ``key``, or None. Every stored hash is compared, in constant time each."""
        digest = hash_key(key)
        found = None
        for tenant in self._current().values():
            for stored in tenant.key_hashes:
                if hmac.compare_digest(stored, digest):
                    found = tenant
        return found

    def _current(self) -> dict[str, Tenant]:
        # Re-read only when another process rewrote the file (the rename gives it a new mtime/inode).
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return {}
        except OSError as error:  # e.g. the data dir is a file
            raise LoragError(f"tenant registry {str(self.path)!r} is unreadable: {error.strerror}",
                             hint="Check --data-dir / LORAG_DATA_DIR") from error
        stamp = stat.st_mtime_ns ^ stat.st_ino
        with self._thread_lock:
            if stamp != self._snapshot.mtime_ns:
                self._snapshot = _Snapshot(stamp, self._read())
            return self._snapshot.tenants

    def _read(self) -> dict[str, Tenant]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            raise LoragError(f"tenant registry {str(self.path)!r} is unreadable: {error}") from error
        if not isinstance(raw, dict):
            raise LoragError(f"tenant registry {str(self.path)!r} is not a JSON object")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise LoragError(
                f"tenant registry {str(self.path)!r} has format_version {version!r}; "
                f"this lorag reads version {FORMAT_VERSION}"
            )
        tenants = {}
        for number, entry in enumerate(raw.get("tenants", []), start=1):
            try:
                tenant = Tenant(
                    id=entry["id"],
                    key_hashes=tuple(entry.get("key_hashes", ())),
                    default_adapter=entry.get("default_adapter"),
                    created_at=entry.get("created_at", ""),
                )
            except (KeyError, TypeError, AttributeError) as error:  # a hand edit gone wrong
                raise LoragError(
                    f"tenant registry {str(self.path)!r}: tenant entry {number} is malformed ({error!r})"
                ) from error
            tenants[tenant.id] = tenant
        return tenants

    # -- editing -------------------------------------------------------------------------------
    def add(self, tenant_id: str, *, default_adapter: str | None = None) -> tuple[Tenant, str]:
        """Create a tenant; returns it with its new API key (the only time the key is visible).

        Raises:
            LoragError: invalid name. Conflict: the tenant already exists.
        """
        validate_tenant_name(tenant_id)
        check_adapter_name(default_adapter)
        key = new_key()
        with self._editing() as tenants:
            if tenant_id in tenants:
                raise Conflict(f"tenant {tenant_id!r} already exists", hint="Use `lorag tenant rotate-key` for a new key")
            created = datetime.now(timezone.utc).isoformat(timespec="seconds")
            tenant = Tenant(tenant_id, (hash_key(key),), default_adapter, created)
            tenants[tenant_id] = tenant
        return tenant, key

    def remove(self, tenant_id: str) -> Tenant:
        """Remove a tenant from the registry (its keys stop working; its indexes stay on disk).

        Raises:
            NotFound: no such tenant.
        """
        with self._editing() as tenants:
            if tenant_id not in tenants:
                raise NotFound(f"tenant {tenant_id!r} does not exist")
            return tenants.pop(tenant_id)

    def rotate_key(self, tenant_id: str) -> str:
        """Replace every key of the tenant with one new key, returned once.

        Raises:
            NotFound: no such tenant.
        """
        key = new_key()
        with self._editing() as tenants:
            if tenant_id not in tenants:
                raise NotFound(f"tenant {tenant_id!r} does not exist")
            tenants[tenant_id] = replace(tenants[tenant_id], key_hashes=(hash_key(key),))
        return key

    def set_default_adapter(self, tenant_id: str, adapter: str | None) -> Tenant:
        check_adapter_name(adapter)
        with self._editing() as tenants:
            if tenant_id not in tenants:
                raise NotFound(f"tenant {tenant_id!r} does not exist")
            tenants[tenant_id] = replace(tenants[tenant_id], default_adapter=adapter)
            return tenants[tenant_id]

    def import_tenant(self, tenant: Tenant) -> None:
        """Store ``tenant`` with its key hashes as they are (the copy tool moves registries this way).

        Raises:
            Conflict: a tenant of that id exists already.
        """
        validate_tenant_name(tenant.id)
        check_adapter_name(tenant.default_adapter)
        with self._editing() as tenants:
            if tenant.id in tenants:
                raise Conflict(f"tenant {tenant.id!r} already exists in {str(self.path)!r}")
            tenants[tenant.id] = tenant

    @contextmanager
    def _editing(self) -> Iterator[dict[str, Tenant]]:
        """Lock, read fresh, let the caller edit, write atomically (nothing is written if it raises)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = open(self._lock_path, "a")
        except OSError as error:
            raise LoragError(f"cannot write the tenant registry in {str(self.path.parent)!r}: {error.strerror}",
                             hint="Check --data-dir / LORAG_DATA_DIR") from error
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                tenants = self._read()
                yield tenants
                self._write(tenants)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self, tenants: dict[str, Tenant]) -> None:
        entries = [asdict(tenant) | {"key_hashes": list(tenant.key_hashes)} for tenant in tenants.values()]
        payload = json.dumps({"format_version": FORMAT_VERSION, "tenants": entries}, indent=2)
        write_atomically(self.path, payload, mode=0o600)  # hashes only, but nobody else needs to read them


def check_adapter_name(name: str | None) -> None:
    """Raises: InvalidAdapter (422) for a default adapter name that no adapter could ever have."""
    if name is not None:
        validate_adapter_name(name)  # the adapter registry's own naming rule




class TenantStore(Protocol):
    """What the server and the CLI need of a tenant registry: ``TenantRegistry`` (tenants.json, the default) or
    ``server.pg_tenants.PgTenantRegistry`` (PostgreSQL, shared by replicas)."""

    def tenants(self) -> list[Tenant]: ...
    def get(self, tenant_id: str) -> Tenant: ...
    def authenticate(self, key: str) -> Tenant | None: ...
    def add(self, tenant_id: str, *, default_adapter: str | None = None) -> tuple[Tenant, str]: ...
    def remove(self, tenant_id: str) -> Tenant: ...
    def rotate_key(self, tenant_id: str) -> str: ...
    def set_default_adapter(self, tenant_id: str, adapter: str | None) -> Tenant: ...


def open_tenant_registry(settings) -> TenantStore:
    """The registry ``settings`` choose: in PostgreSQL when ``retrieval.store`` is a DSN, else tenants.json."""
    from retrieval.pg.database import is_postgres, shared_database

    if is_postgres(settings.retrieval.store):
        from server.pg_tenants import PgTenantRegistry

        return PgTenantRegistry(shared_database(settings.retrieval.store))
    return TenantRegistry(settings.data_dir)
