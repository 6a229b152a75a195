"""Copy one tenant's index between the embedded files and PostgreSQL, vectors included (nothing is re-embedded).

The destination gets the source's manifest (embedder name and dimension), every document with its chunks,
spans, context lines and window vectors, in one update: it shows all of them or, after any failure, none.
"""

import logging
from dataclasses import dataclass

from core.errors import Conflict, NotFound
from core.settings import Settings
from retrieval.pg.database import is_postgres, redact
from retrieval.tenant_indexes import open_index, stored_manifest

log = logging.getLogger(__name__)

STORES = ("files", "postgresql")


@dataclass(frozen=True)
class CopyReport:
    tenant: str
    documents: int
    chunks: int
    vectors: int
    source: str  # where from and where to, for messages (a DSN without its password)
    destination: str


def copy_tenant_index(settings: Settings, tenant: str, *, to: str, dsn: str) -> CopyReport:
    """Copy ``tenant``'s index from the other store into ``to`` ("files" under ``settings.data_dir``, or
    "postgresql" at ``dsn``).

    Raises:
        LoragError: ``to`` or ``dsn`` is invalid, or the database is unreachable or not migrated.
        NotFound: the tenant has no index in the source store.
        Conflict: the destination already holds documents of the tenant, or was built with another embedder.
    """
    from core.errors import LoragError

    if to not in STORES:
        raise LoragError(f"unknown destination store {to!r}", hint=f"Use one of {', '.join(STORES)}")
    if not is_postgres(dsn):
        raise LoragError(f"{redact(dsn)!r} is not a PostgreSQL DSN", hint="Pass postgresql://... (or set "
                         "retrieval.store / LORAG_RETRIEVAL__STORE)")
    files = settings.model_copy(update={"retrieval": settings.retrieval.model_copy(update={"store": "files"})})
    postgres = settings.model_copy(update={"retrieval": settings.retrieval.model_copy(update={"store": dsn})})
    source_settings, destination_settings = (files, postgres) if to == "postgresql" else (postgres, files)
    names = {"files": f"the files in {str(settings.data_dir)!r}", "postgresql": f"PostgreSQL {redact(dsn)!r}"}
    source_name, destination_name = names["files" if to == "postgresql" else "postgresql"], names[to]

    manifest = stored_manifest(source_settings, tenant)
    if manifest is None:
        raise NotFound(f"tenant {tenant!r} has no index in {source_name}")
    source = open_index(source_settings, tenant, embedder_name=manifest.embedder_name,
                        dimension=manifest.dimension, index_type=manifest.index_type, create=False)
    destination = open_index(destination_settings, tenant, embedder_name=manifest.embedder_name,
                             dimension=manifest.dimension)  # Conflict here if built with another embedder
    # Both writers' locks for the whole copy, the files' always first (two copies the opposite ways wait for each
    # other but never deadlock): no commit lands in the source midway, so the copy is one version of it, and
    # nothing is ingested into the destination between the check that it is empty and the commit. Ingest and
    # removal for this tenant, in either store, wait until the copy ends.
    first, second = (source, destination) if to == "postgresql" else (destination, source)
    try:
        with first.update() as first_update, second.update() as second_update:
            update = first_update if first is destination else second_update
            source.refresh()  # the version the lock now holds still (a commit may have landed since it opened)
            existing = destination.documents()
            if existing:
                raise Conflict(
                    f"tenant {tenant!r} already has {len(existing)} documents in {destination_name}; nothing copied",
                    hint="Copy into a store where the tenant has no documents (remove them first with lorag remove)",
                )
            documents = chunks = vectors = 0
            for record in source.documents():
                exported = source.export_document(record.source)
                if exported is None:  # the lock keeps writers out; a row deleted by hand is not copied half
                    raise Conflict(f"tenant {tenant!r}: document {record.source!r} vanished from {source_name} "
                                   "during the copy; nothing copied", hint="Run the copy again")
                update.put_document(*exported)
                documents, chunks, vectors = documents + 1, chunks + len(exported[1]), vectors + len(exported[2])
            update.commit()  # the source's update is left uncommitted: it only held the lock
    finally:
        source.close()
        destination.close()
    log.info("tenant %s: copied %d documents (%d chunks, %d vectors) from %s to %s", tenant, documents, chunks,
             vectors, source_name, destination_name)
    return CopyReport(tenant, documents, chunks, vectors, source_name, destination_name)
