"""Which store holds tenant indexes (``retrieval.store``): the embedded files or PostgreSQL, behind one interface.

``retrieval.index.TenantIndex`` and ``retrieval.pg.index.PgTenantIndex`` answer the same reads (documents,
chunks, neighbours, dense and keyword search) and updates (``update()`` -> put_document / remove_source /
commit); callers open them through these functions and never ask which one they hold.
"""

from core.settings import Settings
from retrieval.manifest import IndexManifest


def _database(settings: Settings):
    from retrieval.pg.database import is_postgres, shared_database

    return shared_database(settings.retrieval.store) if is_postgres(settings.retrieval.store) else None


def index_exists(settings: Settings, tenant: str) -> bool:
    database = _database(settings)
    if database is None:
        from retrieval.index import TenantIndex

        return TenantIndex.exists(settings.data_dir, tenant)
    from retrieval.pg.index import PgTenantIndex

    return PgTenantIndex.exists(database, tenant)


def stored_manifest(settings: Settings, tenant: str) -> IndexManifest | None:
    """The manifest of the tenant's index (embedder name and dimension), or None when it has none.

    Raises:
        LoragError: the manifest is unreadable or from another format.
    """
    database = _database(settings)
    if database is None:
        from core.datadir import index_dir
        from retrieval.manifest import read_manifest

        return read_manifest(index_dir(settings.data_dir, tenant))
    from retrieval.pg.index import read_manifest

    found = read_manifest(database, tenant)
    return None if found is None else found[1]


def open_index(settings: Settings, tenant: str, *, embedder_name: str, dimension: int, index_type: str | None = None,
               create: bool = True):
    """The tenant's index in the configured store (a ``TenantIndex`` or a ``PgTenantIndex``).

    Raises:
        Conflict: the index was built with another embedder. NotFound: no index and ``create`` is false.
        LoragError: the store is unreachable or its schema is not this lorag's.
    """
    index_type = settings.retrieval.index_type if index_type is None else index_type
    database = _database(settings)
    if database is None:
        from retrieval.index import TenantIndex

        return TenantIndex.open(settings.data_dir, tenant, embedder_name=embedder_name, dimension=dimension,
                                index_type=index_type, create=create)
    from retrieval.pg.index import PgTenantIndex

    return PgTenantIndex.open(database, tenant, embedder_name=embedder_name, dimension=dimension,
                              index_type=index_type, create=create)


def retire_index(settings: Settings, tenant: str, *, purge: bool, stamp: str) -> str | None:
    """Take a removed tenant's index out of service so that a tenant created later under its name starts empty.

    The embedded files live in the tenant's folder, which the caller moves or deletes (None here). In PostgreSQL
    the index is deleted (``purge``) or renamed ``<tenant>#<stamp>``, a name no tenant can have ("#" is not
    allowed in tenant names), where an operator can still copy it out; returns that name, or "purged".
    """
    database = _database(settings)
    if database is None:
        return None
    from retrieval.pg.index import PgTenantIndex, read_manifest

    found = read_manifest(database, tenant)
    if found is None:
        return None
    index_id, manifest = found
    index = PgTenantIndex(database, index_id=index_id, tenant=tenant, manifest=manifest)
    if purge:
        index.drop()
        return "purged"
    return index.rename(f"{tenant}#{stamp}")
