"""The tenant registry in PostgreSQL (``lorag.tenants``, ``lorag.tenant_keys``), for ``retrieval.store = postgresql://``.

The same contract as ``server.tenants.TenantRegistry``: keys shown once, only their sha256 stored. Nothing is
cached, so every replica on the database sees a tenant created, rotated or removed through another at once.
"""

from datetime import datetime, timezone

from core.datadir import validate_tenant_name
from core.errors import Conflict, NotFound
from retrieval.pg.database import Database
from server.tenants import Tenant, check_adapter_name, hash_key, new_key

_TENANT_COLUMNS = (
    "t.id, t.default_adapter, t.created_at, "
    "coalesce((SELECT array_agg(k.key_hash ORDER BY k.key_hash) FROM lorag.tenant_keys k WHERE k.tenant_id = t.id),"
    " '{}')"
)


class PgTenantRegistry:
    """Reads and edits the tenants in PostgreSQL; safe across processes and threads (one transaction per call)."""

    def __init__(self, database: Database):
        self.database = database

    # -- reading -------------------------------------------------------------------------------
    def tenants(self) -> list[Tenant]:
        with self.database.connection() as connection:
            rows = connection.execute(f"SELECT {_TENANT_COLUMNS} FROM lorag.tenants t ORDER BY t.id").fetchall()
        return [_tenant(row) for row in rows]

    def get(self, tenant_id: str) -> Tenant:
        """Raises: NotFound when no tenant has that id."""
        with self.database.connection() as connection:
            row = connection.execute(f"SELECT {_TENANT_COLUMNS} FROM lorag.tenants t WHERE t.id = %s",
                                     (tenant_id,)).fetchone()
        if row is None:
            raise NotFound(f"tenant {tenant_id!r} does not exist", hint="List tenants with `lorag tenant list`")
        return _tenant(row)

    def authenticate(self, key: str) -> Tenant | None:
        """The tenant owning ``key``, or None. An index lookup of the key's sha256: timing can at most reveal
        something about a hash, never about a key, and keys are 256-bit random."""
        with self.database.connection() as connection:
            row = connection.execute(
                f"SELECT {_TENANT_COLUMNS} FROM lorag.tenants t JOIN lorag.tenant_keys k ON k.tenant_id = t.id "
                "WHERE k.key_hash = %s", (hash_key(key),)).fetchone()
        return None if row is None else _tenant(row)

    # -- editing -------------------------------------------------------------------------------
    def add(self, tenant_id: str, *, default_adapter: str | None = None) -> tuple[Tenant, str]:
        """Create a tenant; returns it with its new API key (the only time the key is visible).

        Raises:
            LoragError: invalid name. Conflict: the tenant already exists.
        """
        validate_tenant_name(tenant_id)
        check_adapter_name(default_adapter)
        key = new_key()
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self.database.connection() as connection:
            inserted = connection.execute(
                "INSERT INTO lorag.tenants (id, default_adapter, created_at) VALUES (%s, %s, %s) "
                "ON CONFLICT (id) DO NOTHING RETURNING id", (tenant_id, default_adapter, created)).fetchone()
            if inserted is None:
                raise Conflict(f"tenant {tenant_id!r} already exists", hint="Use `lorag tenant rotate-key` for a new key")
            connection.execute("INSERT INTO lorag.tenant_keys (key_hash, tenant_id) VALUES (%s, %s)",
                               (hash_key(key), tenant_id))
        return Tenant(tenant_id, (hash_key(key),), default_adapter, created), key

    def remove(self, tenant_id: str) -> Tenant:
        """Remove a tenant (its keys stop working at once, on every replica).

        Raises:
            NotFound: no such tenant.
        """
        with self.database.connection() as connection:
            row = connection.execute(f"SELECT {_TENANT_COLUMNS} FROM lorag.tenants t WHERE t.id = %s FOR UPDATE",
                                     (tenant_id,)).fetchone()
            if row is None:
                raise NotFound(f"tenant {tenant_id!r} does not exist")
            connection.execute("DELETE FROM lorag.tenants WHERE id = %s", (tenant_id,))  # keys cascade
        return _tenant(row)

    def rotate_key(self, tenant_id: str) -> str:
        """Replace every key of the tenant with one new key, returned once.

        Raises:
            NotFound: no such tenant.
        """
        key = new_key()
        with self.database.connection() as connection:
            if connection.execute("SELECT 1 FROM lorag.tenants WHERE id = %s FOR UPDATE", (tenant_id,)).fetchone() is None:
                raise NotFound(f"tenant {tenant_id!r} does not exist")
            connection.execute("DELETE FROM lorag.tenant_keys WHERE tenant_id = %s", (tenant_id,))
            connection.execute("INSERT INTO lorag.tenant_keys (key_hash, tenant_id) VALUES (%s, %s)",
                               (hash_key(key), tenant_id))
        return key

    def set_default_adapter(self, tenant_id: str, adapter: str | None) -> Tenant:
        """Raises: NotFound: no such tenant. InvalidAdapter: a name no adapter could have."""
        check_adapter_name(adapter)
        with self.database.connection() as connection:
            if connection.execute("UPDATE lorag.tenants SET default_adapter = %s WHERE id = %s RETURNING id",
                                  (adapter, tenant_id)).fetchone() is None:
                raise NotFound(f"tenant {tenant_id!r} does not exist")
        return self.get(tenant_id)

    def import_tenant(self, tenant: Tenant) -> None:
        """Store ``tenant`` with its key hashes as they are (the copy tool moves registries this way).

        Raises:
            Conflict: a tenant of that id exists already.
        """
        validate_tenant_name(tenant.id)  # what the file registry checks too: the same input is good for both
        check_adapter_name(tenant.default_adapter)
        with self.database.connection() as connection:
            if connection.execute(
                "INSERT INTO lorag.tenants (id, default_adapter, created_at) VALUES (%s, %s, %s) "
                "ON CONFLICT (id) DO NOTHING RETURNING id", (tenant.id, tenant.default_adapter, tenant.created_at)
            ).fetchone() is None:
                raise Conflict(f"tenant {tenant.id!r} already exists in the PostgreSQL registry")
            for digest in tenant.key_hashes:
                connection.execute("INSERT INTO lorag.tenant_keys (key_hash, tenant_id) VALUES (%s, %s)",
                                   (digest, tenant.id))


def _tenant(row: tuple) -> Tenant:
    tenant_id, default_adapter, created_at, key_hashes = row
    return Tenant(tenant_id, tuple(key_hashes), default_adapter, created_at)
