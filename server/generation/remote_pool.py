"""The vLLM servers behind ``generation.engine = "remote"``: which are up, which adapters each has loaded, and
pushing or dropping adapters there through vLLM's runtime adapter API.

vLLM keeps runtime adapters (``POST /v1/load_lora_adapter``) in memory only: a restarted server has forgotten
them. The pool notices through ``/v1/models`` (polled) or a chat answered 404 "model does not exist", and
pushes the adapter again. The calls here block (httpx's sync client): callers run them in worker threads.
"""

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import httpx

from core.errors import Conflict
from server.errors import RemoteFailed, RemoteUnavailable

log = logging.getLogger(__name__)

LOAD = "/v1/load_lora_adapter"
UNLOAD = "/v1/unload_lora_adapter"
MODELS = "/v1/models"
SHARED_STORAGE_HINT = (
    "every vLLM server must read lorag's adapter directories at the path lorag sends: mount the same shared "
    "storage on them, and set generation.remote_adapter_dir to where they see lorag's data directory"
)


class AdapterUnreadable(RemoteFailed):
    """A vLLM server cannot read an adapter's directory: the shared-storage requirement is broken."""

    code = "adapter_unreadable"


class ServerDown(Exception):
    """One vLLM server did not answer (refused, reset, timed out); the caller tries another."""


@dataclass
class VllmServer:
    """What lorag knows about one vLLM server."""

    url: str
    up: bool | None = None  # None until first heard from
    loaded: set[str] = field(default_factory=set)  # lora names it has loaded (as far as lorag knows)
    base_model: str | None = None  # the model its /v1/models lists without a parent
    max_model_len: int | None = None
    error: str | None = None  # why it is down, for the log and /metrics
    checked_at: float | None = None

    @property
    def label(self) -> str:
        """The URL without credentials, for health output, metrics and messages."""
        parts = urlsplit(self.url)
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class RemotePool:
    def __init__(self, urls: list[str], *, api_key: str | None, timeout_s: float):
        self.servers = [VllmServer(url) for url in urls]
        self.adapters: dict[str, str] = {}  # lora name -> lora_path sent to vLLM, for every adapter lorag keeps loaded
        self.failures: Counter = Counter()  # (server label, reason) -> count
        self.failovers = 0
        self.pushes: Counter = Counter()  # server label -> adapters pushed
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = httpx.Timeout(timeout_s, connect=min(5.0, timeout_s))
        self._client = httpx.Client(timeout=self.timeout, headers=self.headers)
        self._lock = threading.Lock()
        self._next = 0  # round-robin start among healthy servers
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    # ---- health --------------------------------------------------------------------------------
    def probe(self, server: VllmServer) -> None:
        """Ask ``server`` for /v1/models: up or down, its base model and context, the adapters it still has.
        An adapter lorag keeps loaded that the server no longer lists (it restarted) is pushed again."""
        try:
            response = self._client.get(server.url + MODELS)
            response.raise_for_status()
            cards = response.json()["data"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as error:
            self.mark_down(server, f"GET {MODELS}: {error_reason(error)}")
            return
        names = {card["id"] for card in cards if card.get("parent")}
        base = next((card for card in cards if not card.get("parent")), None)
        with self._lock:
            server.base_model = base["id"] if base else server.base_model
            server.max_model_len = (base or {}).get("max_model_len") or server.max_model_len
            server.loaded = names
            wanted = [name for name in self.adapters if name not in names]
        self.mark_up(server)
        for name in wanted:
            log.info("vLLM server %s does not list adapter %s (restarted?): pushing it again", server.label, name)
            try:
                self.push(server, name)
            except (ServerDown, RemoteFailed, Conflict) as error:
                log.warning("re-pushing adapter %s to %s failed: %s", name, server.label, error)

    def probe_all(self) -> None:
        for server in self.servers:
            self.probe(server)

    def start_polling(self, interval_s: float) -> None:
        if interval_s > 0 and self._poller is None:
            self._poller = threading.Thread(target=self._poll, args=(interval_s,), name="lorag-remote-health",
                                            daemon=True)
            self._poller.start()

    def _poll(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.probe_all()
            except Exception:  # noqa: BLE001 - the poller must outlive one bad answer
                log.exception("polling the vLLM servers failed")

    def close(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join()
        self._client.close()

    def mark_up(self, server: VllmServer) -> None:
        with self._lock:
            was = server.up
            server.up, server.error, server.checked_at = True, None, time.time()
        if was is False:
            log.warning("vLLM server %s is up again", server.label)

    def mark_down(self, server: VllmServer, reason: str) -> None:
        with self._lock:
            was = server.up
            server.up, server.error, server.checked_at = False, reason, time.time()
            server.loaded.clear()  # whatever it had, a server that comes back may have restarted
            self.failures[(server.label, "unreachable")] += 1
        if was is not False:
            log.error("vLLM server %s is down: %s", server.label, reason)

    def count_failure(self, server: VllmServer, reason: str) -> None:
        with self._lock:
            self.failures[(server.label, reason)] += 1

    def candidates(self) -> list[VllmServer]:
        """Every server, in the order to try them: those up (rotating), then unknown, then those down (a
        down server may be back; it is tried last rather than never)."""
        with self._lock:
            start = self._next
            self._next += 1
        rotated = self.servers[start % len(self.servers):] + self.servers[: start % len(self.servers)]
        return sorted(rotated, key=lambda server: {True: 0, None: 1, False: 2}[server.up])

    # ---- adapters ------------------------------------------------------------------------------
    def register(self, name: str, path: str) -> None:
        """Push adapter ``name`` (vLLM reads it from ``path``) to every server that answers.

        Raises:
            AdapterUnreadable: a server cannot read ``path``.  Conflict: vLLM refuses the adapter itself.
            RemoteUnavailable: no server answered.
        """
        with self._lock:
            self.adapters[name] = path
        down = []
        for server in self.servers:
            try:
                self.push(server, name)
            except ServerDown as error:
                down.append(f"{server.label}: {error}")
            except BaseException:
                with self._lock:
                    self.adapters.pop(name, None)
                raise
        if len(down) == len(self.servers):
            with self._lock:
                self.adapters.pop(name, None)
            log.error("no vLLM server could load adapter %s: %s", name, "; ".join(down))
            raise RemoteUnavailable(f"no generation server could be reached to load adapter {_public(name)}",
                                    hint="retry later; the lorag server log has the details")

    def ensure(self, server: VllmServer, name: str) -> None:
        """Make sure ``server`` has ``name`` loaded (a server that was down or restarted gets it now)."""
        with self._lock:
            known = name in server.loaded
        if not known:
            self.push(server, name)

    def forget(self, server: VllmServer, name: str) -> None:
        with self._lock:
            server.loaded.discard(name)

    def push(self, server: VllmServer, name: str) -> None:
        """``POST /v1/load_lora_adapter`` on one server. "Already loaded" counts as loaded: the name holds the
        content hash, so the adapter there is this very version.

        Raises:
            ServerDown, AdapterUnreadable, Conflict (vLLM refused the adapter), RemoteFailed (any other answer).
        """
        with self._lock:
            path = self.adapters.get(name)
        if path is None:
            raise Conflict(f"adapter {_public(name)} is no longer loaded in lorag; retry the request")
        try:
            response = self._client.post(server.url + LOAD, json={"lora_name": name, "lora_path": path})
        except httpx.HTTPError as error:
            self.mark_down(server, f"POST {LOAD}: {error_reason(error)}")
            raise ServerDown(error_reason(error)) from error
        message = error_message(response)
        if response.status_code == 200 or (response.status_code == 400 and "has already been loaded" in message):
            with self._lock:
                server.loaded.add(name)
                self.pushes[server.label] += 1
            log.info("adapter %s loaded on vLLM server %s from %s", name, server.label, path)
            return
        self.count_failure(server, f"load_{response.status_code}")
        if response.status_code in (404, 405) and not _unreadable(message):
            # vLLM adds the route only when VLLM_ALLOW_RUNTIME_LORA_UPDATING is set
            log.error("vLLM server %s has no %s (%d: %s)", server.label, LOAD, response.status_code, message)
            raise RemoteFailed(
                f"the generation server does not offer {LOAD}, so adapter {_public(name)} cannot be served",
                hint="start vLLM with --enable-lora and the environment variable VLLM_ALLOW_RUNTIME_LORA_UPDATING=True",
            )
        if response.status_code == 404 or _unreadable(message):
            # vLLM hides paths in its messages; lorag names the one it sent, in the log only: tenants never see
            # server paths.
            log.error("vLLM server %s cannot read adapter %s at %r (it answered %d: %s); %s",
                      server.label, name, path, response.status_code, message, SHARED_STORAGE_HINT)
            raise AdapterUnreadable(
                f"adapter {_public(name)} cannot be served: the generation server cannot read its directory "
                "(the lorag server log names the path)",
                hint="an operator must give the vLLM servers read access to lorag's adapter storage "
                "(generation.remote_adapter_dir)",
            )
        if response.status_code == 400 or "max_lora_rank" in message or "not supported" in message:
            # vLLM 0.32 answers an adapter it will not run (rank, bias) with a 500 carrying PEFTHelper's reason
            raise Conflict(f"the generation server refuses adapter {_public(name)}: {message}",
                           hint="check vLLM's --max-lora-rank and the adapter's target modules")
        log.error("vLLM server %s failed to load adapter %s (%d: %s)", server.label, name, response.status_code,
                  message)
        if response.status_code in (401, 403):
            raise RemoteFailed("the generation server refused lorag's key (generation.remote_api_key)")
        raise RemoteFailed(f"the generation server failed to load adapter {_public(name)} ({response.status_code})",
                           hint="the lorag server log has the details")

    def unregister(self, name: str) -> None:
        """``POST /v1/unload_lora_adapter`` everywhere; a server that lacks it or is down is fine (nothing to
        unload there, and a server that comes back never gets it again)."""
        with self._lock:
            self.adapters.pop(name, None)
        for server in self.servers:
            with self._lock:
                server.loaded.discard(name)
            if server.up is False:
                continue
            try:
                response = self._client.post(server.url + UNLOAD, json={"lora_name": name})
            except httpx.HTTPError as error:
                self.mark_down(server, f"POST {UNLOAD}: {error_reason(error)}")
                continue
            if response.status_code not in (200, 404):
                log.warning("vLLM server %s did not unload adapter %s (%d: %s)", server.label, name,
                            response.status_code, error_message(response))
            else:
                log.info("adapter %s unloaded from vLLM server %s", name, server.label)

    # ---- reporting -----------------------------------------------------------------------------
    def states(self) -> list[dict]:
        with self._lock:
            return [{"server": s.label, "up": s.up, "adapters": len(s.loaded), "model": s.base_model}
                    for s in self.servers]


def error_message(response: httpx.Response) -> str:
    """vLLM's message from its error object ``{"error": {"message", "type", "param", "code"}}``, else the text."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if body.get("message"):  # older vLLM answered the ErrorResponse fields at the top level
            return str(body["message"])
    return response.text.strip()[:500]


def _unreadable(message: str) -> bool:
    return any(text in message for text in ("No adapter found", "Permission denied", "No such file"))


def _public(name: str) -> str:
    """The adapter as its tenant knows it: ``tenant:adapter@version`` -> 'adapter'."""
    tenant_adapter = name.partition("@")[0]
    return repr(tenant_adapter.partition(":")[2] or tenant_adapter)


def error_reason(error: BaseException) -> str:
    """An exception as one log/message line: its type, and its text when it has one."""
    text = str(error) or type(error).__name__
    return f"{type(error).__name__}: {text}" if text != type(error).__name__ else text
