"""``lorag db``: create or upgrade the PostgreSQL schema, and copy a tenant between the files and PostgreSQL."""

import argparse

from core.errors import Conflict, LoragError, NotFound

DB_EPILOG = """examples:
  lorag db migrate --dsn postgresql://lorag@db.internal/lorag      create or upgrade the schema
  lorag db copy-tenant acme --to postgresql --dsn postgresql://lorag@db.internal/lorag
  lorag db copy-tenant acme --to files       (back into --data-dir; the DSN from retrieval.store)
"""


def add_commands(subparsers, common: argparse.ArgumentParser) -> None:
    db = subparsers.add_parser("db", help="PostgreSQL store: schema migrations, copying tenants",
                               epilog=DB_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = db.add_subparsers(dest="action", metavar="ACTION", required=True)
    dsn_help = "PostgreSQL DSN (default: retrieval.store, env LORAG_RETRIEVAL__STORE)"
    migrate = actions.add_parser("migrate", parents=[common], help="create or upgrade the lorag schema")
    migrate.add_argument("--dsn", help=dsn_help)
    migrate.set_defaults(handler=run_migrate)
    copy = actions.add_parser("copy-tenant", parents=[common],
                              help="copy a tenant's documents, chunks, vectors and keys between the stores")
    copy.add_argument("tenant")
    copy.add_argument("--to", required=True, choices=["postgresql", "files"], help="the destination store")
    copy.add_argument("--dsn", help=dsn_help)
    copy.set_defaults(handler=run_copy_tenant)


def _settings_and_dsn(args: argparse.Namespace):
    from core.settings import load_settings
    from retrieval.pg.database import is_postgres

    settings = load_settings(config_file=args.config, data_dir=args.data_dir)
    dsn = args.dsn or settings.retrieval.store
    if not is_postgres(dsn):
        raise LoragError("no PostgreSQL database named",
                         hint="Pass --dsn postgresql://... or set retrieval.store (LORAG_RETRIEVAL__STORE)")
    return settings, dsn


def run_migrate(args: argparse.Namespace) -> int:
    from retrieval.pg.database import redact
    from retrieval.pg.schema import migrate

    _, dsn = _settings_and_dsn(args)
    before, after = migrate(dsn)
    if before == after:
        print(f"{redact(dsn)}: lorag schema is at version {after}, nothing to do")
    else:
        print(f"{redact(dsn)}: lorag schema migrated from version {before or 0} to {after}")
    return 0


def run_copy_tenant(args: argparse.Namespace) -> int:
    from core.datadir import validate_tenant_name
    from retrieval.copy_tenant import copy_tenant_index
    from retrieval.pg.database import shared_database
    from server.pg_tenants import PgTenantRegistry
    from server.tenants import TenantRegistry

    settings, dsn = _settings_and_dsn(args)
    validate_tenant_name(args.tenant)
    # The tenant's registry entry (key hashes, default adapter) goes first, so its API keys keep working; a run
    # stopped after it (or after a failed index copy) is finished by running it again.
    files, postgres = TenantRegistry(settings.data_dir), PgTenantRegistry(shared_database(dsn))
    source, destination = (files, postgres) if args.to == "postgresql" else (postgres, files)
    registered = True
    try:
        entry = source.get(args.tenant)
    except NotFound:
        registered = False
        print(f"tenant {args.tenant}: not in the source's tenant registry; create it with `lorag tenant add`")
    else:
        try:
            destination.import_tenant(entry)
            print(f"tenant {args.tenant}: registry entry copied ({len(entry.key_hashes)} key(s) keep working)")
        except Conflict:
            print(f"tenant {args.tenant}: already in the destination's tenant registry, keys left as they are there")
    try:
        report = copy_tenant_index(settings, args.tenant, to=args.to, dsn=dsn)
    except NotFound:
        if not registered:
            raise
        # A tenant that never ingested anything: its registry entry was all there was to copy.
        print(f"tenant {args.tenant}: no index in the source, so no documents to copy")
        return 0
    print(f"tenant {args.tenant}: copied {report.documents} documents ({report.chunks} chunks, {report.vectors} "
          f"vectors) from {report.source} to {report.destination}")
    return 0
