"""No query path of the PostgreSQL index returns another tenant's rows, whatever the caller passes it.

Two tenants hold the same sources (so paths, texts and vectors collide); every public method of
PgTenantIndex is called on one tenant with the other's ids, sources and vectors. A new public method fails the
test until it is listed here with its calls.
"""

import inspect

from retrieval.pg.database import shared_database
from retrieval.pg.index import PgTenantIndex
from retrieval.pg.update import PgIndexUpdate
from tests.retrieval.conftest import CORPUS, make_document

# Methods that return no tenant data, or write (writes are checked through the reads after them).
NOT_QUERIES = {"open", "exists", "close", "refresh", "update", "drop", "rename", "moved"}  # they return no rows
COUNTS = {"term_weights"}  # returns numbers, not rows: checked below to count the tenant's own chunks only


def test_no_query_method_returns_another_tenants_rows(postgres_dsn, embedder, corpus_vectors):
    database = shared_database(postgres_dsn)
    indexes = {}
    for tenant, sources in (("acme", list(CORPUS)), ("globex", ["handbook/warranty.md", "recipes/bread.txt"])):
        index = PgTenantIndex.open(database, tenant, embedder_name=embedder.name, dimension=embedder.dimension)
        with index.update() as update:
            for source in sources:
                heading, paragraphs = CORPUS[source]
                # Same source paths, different texts per tenant: a leak would show as the other tenant's text.
                texts = [f"{tenant} {text}" for text in paragraphs]
                update.put_document(*make_document(tenant, source, heading, texts), corpus_vectors[source])
            update.commit()
        indexes[tenant] = index
    acme, globex = indexes["acme"], indexes["globex"]
    acme_chunks = [c for record in acme.documents() for c in acme.chunks_of(record.document_id)]
    acme_ids = {c.id for c in acme_chunks}
    acme_documents = {record.document_id for record in acme.documents()}
    vector = corpus_vectors["handbook/calibration.md"][1]  # a document only acme has

    calls = {
        "documents": [()],
        "document": [(document_id,) for document_id in acme_documents],
        "document_by_source": [(source,) for source in CORPUS],
        "chunk": [(chunk_id,) for chunk_id in acme_ids],
        "chunks_of": [(document_id,) for document_id in acme_documents],
        "neighbours": [(chunk_id,) for chunk_id in acme_ids],
        "search_dense": [(vector, 50), (vector, 50, {"sources": list(CORPUS)})],
        "search_keyword": [("acme QX-7731B probe warranty calibration fjords", 50),
                           ("acme probe", 50, {"sources": list(CORPUS)})],
        "export_document": [(source,) for source in CORPUS],
    }
    public = {name for name, member in inspect.getmembers(PgTenantIndex)
              if not name.startswith("_") and callable(member)}
    assert public - NOT_QUERIES - COUNTS == set(calls), "list the new query method's calls here"
    assert {name for name in dir(PgIndexUpdate) if not name.startswith("_")} == \
        {"put_document", "remove_source", "commit", "discard"}  # writes: scoped to the locked index

    returned = []
    for name, arguments in calls.items():
        for call in arguments:
            keywords = call[-1] if call and isinstance(call[-1], dict) else {}
            positional = call[:-1] if keywords else call
            result = getattr(globex, name)(*positional, **keywords)
            returned.append((name, result))
    seen_any = False
    for name, result in returned:
        for item in _flatten(result):
            seen_any = True
            assert item.tenant == "globex", f"{name} returned a row of tenant {item.tenant!r}"
            if hasattr(item, "text"):
                assert item.text.startswith("globex "), f"{name} returned another tenant's chunk"
                assert item.id not in acme_ids, name
            else:
                assert item.document_id not in acme_documents, name
    assert seen_any  # globex's own rows do come back: the calls really queried
    assert globex.search_keyword("QX-7731B calibration fjords", 50) == []  # terms only acme has
    assert all(c.source in {"handbook/warranty.md", "recipes/bread.txt"} for c, _ in globex.search_dense(vector, 50))
    assert len(globex) == 5 and len(acme) == 10
    # Term rarity counts the tenant's own chunks: words only acme has are, for globex, words no chunk holds.
    from retrieval.keyword import idf

    rare = globex.term_weights("fjords Hardanger warranty").weights
    assert rare["fjord"] == rare["hardang"] == idf(0, len(globex)) > rare["warranti"]


def _flatten(result):
    if result is None:
        return []
    if isinstance(result, tuple) and len(result) == 3 and hasattr(result[0], "document_id"):  # export_document
        return [result[0], *result[1]]
    if isinstance(result, list):
        return [item[0] if isinstance(item, tuple) else item for item in result]
    return [result]
