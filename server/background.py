"""Run an app on a real uvicorn server in a background thread (the demo, end-to-end tests, benchmarks)."""

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from core.errors import LoragError

STARTUP_TIMEOUT_S = 300.0  # the lifespan may load a model


@contextmanager
def serving(app, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> Iterator[str]:
    """Serve ``app`` until the block ends; yields the base URL. ``port=0`` picks a free port.

    Raises:
        LoragError: the server did not start (port taken, lifespan failed) within the timeout.
    """
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="lorag-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise LoragError(f"the server on {host}:{port} did not start; see the log above")
        time.sleep(0.05)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
