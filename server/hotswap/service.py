"""The running server's adapters: discovered on disk without restart, validated, loaded on demand, evicted LRU.

Every adapter version has its own key (``tenant:name@version``): a replaced adapter loads under a new key,
and requests already running keep the version they started with until they end (also after a delete);
the old key is unloaded when its last request finishes.
"""

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

from core.errors import Conflict, LoragError, NotFound
from adapters.manifest import MANIFEST_FILE, AdapterManifest, LoraSpec, prompt_format_warning
from adapters.host import AdapterHost, HostAdapter
from adapters.registry import AdapterDir, AdapterRegistry
from server.hotswap.residency import Residency
from adapters.validation import (
    CheckedAdapter, CheckUnavailable, check_adapter_dir, check_finite_weights, check_weights_header, public_model_name,
    read_host_adapter,
)
from adapters.registry import InvalidAdapter, validate_adapter_name
from adapters.peft_files import is_pickle
from server.errors import InvalidRequest, ServerBusy
from server.quotas import check_adapter_quota, tree_bytes

log = logging.getLogger(__name__)

LOSS_PLOT = "loss.png"
RUNTIME_FILE = "lorag_runtime.json"  # marks an adapter added by vLLM's load_lora_adapter
_RESIDENCY_LEVEL = {"disk": 0, "unloaded": 0, "host": 1, "gpu": 2}


@dataclass
class AdapterStats:
    requests: int = 0
    tokens: int = 0
    last_used: float | None = None  # unix time
    load_time_ms: float | None = None  # last disk/host -> device load


@dataclass(eq=False)
class _Version:
    checked: CheckedAdapter
    users: int = 0  # running requests
    retired: bool = False  # replaced or deleted: unload once unused
    host: HostAdapter | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)  # one load of this version at a time

    @property
    def key(self) -> str:
        return self.checked.key


@dataclass(eq=False)
class _Entry:
    dir: AdapterDir
    version: _Version
    stats: AdapterStats
    unloaded: bool = False  # explicitly unloaded through the API


class AdapterMetrics:
    """Per-adapter series in the app's own Prometheus registry (server.metrics.Metrics.registry)."""

    def __init__(self, registry):
        labels = ["tenant", "adapter"]
        self.residency = Gauge("lorag_adapter_residency", "0 disk, 1 host memory, 2 model device", labels, registry=registry)
        self.requests = Counter("lorag_adapter_requests", "Requests served with the adapter", labels, registry=registry)
        self.tokens = Counter("lorag_adapter_tokens", "Answer tokens generated with the adapter", labels, registry=registry)
        self.last_used = Gauge("lorag_adapter_last_used_timestamp", "Unix time of the last request", labels, registry=registry)
        self.load_seconds = Histogram("lorag_adapter_load_seconds", "Adapter load onto the model device", ["tenant"],
                                      buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
                                      registry=registry)
        self.events = Counter("lorag_adapter_events", "Adapter loads, evictions, unloads and rejections", ["event"],
                              registry=registry)


class AdapterLease:
    """A request's hold on one adapter version; ``hold(deltas)`` releases it when the stream ends."""

    def __init__(self, service: "AdapterService", entry: _Entry, version: _Version):
        self._service, self._entry, self._version = service, entry, version
        self._released = False

    @property
    def key(self) -> str:
        return self._version.key

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._service._release(self._version)

    def hold(self, deltas):
        return _HeldDeltas(self, deltas)

    def add_tokens(self, tokens: int) -> None:
        if tokens:
            self._entry.stats.tokens += tokens
            self._service._metrics_for(self._entry, "tokens").inc(tokens)


class _HeldDeltas:
    """The generator's deltas, counting tokens and releasing the lease when they end or are closed."""

    def __init__(self, lease: AdapterLease, deltas):
        self._lease, self._deltas = lease, deltas.__aiter__()

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            delta = await self._deltas.__anext__()
        except BaseException:
            self._lease.release()
            raise
        self._lease.add_tokens(delta.tokens)
        return delta

    async def aclose(self):
        try:
            aclose = getattr(self._deltas, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            self._lease.release()


class AdapterService:
    def __init__(self, settings, *, host: AdapterHost | None, metrics=None):
        """``settings``: ServerSettings (data_dir, adapters). ``host``: the generator, or None when it cannot
        serve adapters (listing still works; loading is refused)."""
        self.settings = settings.adapters
        self.quotas = getattr(settings, "quotas", None)
        self.data_dir = settings.data_dir
        self.registry = AdapterRegistry(settings.data_dir)
        self._register_lock = threading.Lock()
        self.host = host
        self.served = host.served_model() if host is not None else None
        if self.served is not None:
            aliases = [settings.server.served_model_name, *self.settings.base_model_aliases]
            self.served = dataclasses.replace(self.served, aliases=tuple(a for a in aliases if a))
        self.metrics = AdapterMetrics(metrics.registry) if metrics is not None else None
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._versions: dict[str, _Version] = {}  # current versions and retired ones not yet discarded
        self._stats: dict[tuple[str, str], AdapterStats] = {}  # survive replacement of a version
        self._rejected: dict[tuple[str, str], tuple] = {}  # stamp of a dir already refused (logged once)
        max_device = self.settings.max_resident
        if self.served is not None and self.served.max_adapters is not None and self.served.max_adapters < max_device:
            log.warning("adapters.max_resident=%d but the generator holds %d adapters at once; keeping %d on the device",
                        max_device, self.served.max_adapters, self.served.max_adapters)
            max_device = self.served.max_adapters
        self._residency = Residency(max_device=max_device, max_host=self.settings.max_host)
        self._lock = threading.Condition()
        self._device_lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._discarder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorag-adapter-unload")
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Scan once, load pinned adapters, then re-scan every ``adapters.poll_interval_s`` in a thread."""
        self.refresh()
        if self.settings.poll_interval_s > 0:
            self._poller = threading.Thread(target=self._poll, name="lorag-adapter-poll", daemon=True)
            self._poller.start()

    def close(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join()
        self._discarder.shutdown(wait=True)

    def _poll(self) -> None:
        while not self._stop.wait(self.settings.poll_interval_s):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - polling must survive a bad moment on disk
                log.exception("adapter scan failed")

    # ---- discovery -----------------------------------------------------------------------------
    def refresh(self) -> None:
        """Pick up new, changed and removed adapter dirs (validating only what changed)."""
        with self._refresh_lock:
            found = self.registry.scan()
            with self._lock:
                known = {ident: entry.dir.stamp for ident, entry in self._entries.items()}
            for ident, adapter_dir in found.items():
                if known.get(ident) == adapter_dir.stamp or self._rejected.get(ident) == adapter_dir.stamp:
                    continue
                try:
                    checked = self._check(adapter_dir.path, tenant=adapter_dir.tenant, name=adapter_dir.name)
                except CheckUnavailable as error:  # not the folder's fault: the next scan tries it again
                    log.warning("adapter %s/%s not checked: %s", *ident, error)
                    continue
                except Exception as error:  # noqa: BLE001 - one malformed folder must not stop discovery of the rest
                    self._rejected[ident] = adapter_dir.stamp
                    self._event("reject")
                    log.warning("adapter %s/%s rejected: %s", *ident, error)
                    continue
                self._rejected.pop(ident, None)
                self._install(adapter_dir, checked)
            for ident in set(known) - set(found):
                self._retire(ident, reason="removed from disk")
            self._load_pinned()

    def _check(self, path: Path, *, tenant: str, name: str) -> CheckedAdapter:
        return check_adapter_dir(path, tenant=tenant, name=name, served=self.served,
                                 max_rank=self.settings.max_rank, max_bytes=self.settings.max_upload_bytes)

    def _install(self, adapter_dir: AdapterDir, checked: CheckedAdapter) -> None:
        ident = (adapter_dir.tenant, adapter_dir.name)
        with self._lock:
            old = self._entries.get(ident)
            if old is not None and old.version.key == checked.key:  # touched, same content
                old.dir = adapter_dir
                return
            stats = self._stats.setdefault(ident, AdapterStats())
            version = _Version(checked)
            self._entries[ident] = _Entry(adapter_dir, version, stats)
            self._versions[checked.key] = version
        log.info("adapter %s/%s version %s %s", *ident, checked.version, "replaced" if old else "discovered")
        if (warning := prompt_format_warning(checked.manifest)) is not None:
            log.warning("%s", warning)
        if old is not None:
            self._retire_version(old.version, reason=f"replaced by version {checked.version}")
        self._set_residency_metric(ident)

    def _retire(self, ident: tuple[str, str], *, reason: str) -> None:
        with self._lock:
            entry = self._entries.pop(ident, None)
        if entry is not None:
            log.info("adapter %s/%s %s", *ident, reason)
            self._retire_version(entry.version, reason=reason)
            if self.metrics is not None:
                self.metrics.residency.labels(*ident).set(0)

    def _retire_version(self, version: _Version, *, reason: str) -> None:
        with self._lock:
            version.retired = True
            idle = version.users == 0
        if idle:
            self._discard(version)
        else:
            log.info("adapter %s stays loaded for %d running request(s) (%s)", version.key, version.users, reason)

    def _discard(self, version: _Version) -> None:
        """Take a retired version off the device and out of host memory."""
        with self._device_lock:
            with self._lock:
                if version.users:
                    return
                if self._versions.get(version.key) is version:
                    del self._versions[version.key]
                on_device = self._residency.tier(version.key) == "device"
                self._residency.drop(version.key)
                version.host = None
            if on_device and self.host is not None:
                self.host.unload_adapter(version.key)
                self._event("unload")
                log.info("adapter %s unloaded (retired)", version.key)

    def _load_pinned(self) -> None:
        if self.host is None:
            return
        for pinned in self.settings.pinned:
            tenant, _, name = pinned.partition("/")
            with self._lock:
                entry = self._entries.get((tenant, name))
                if entry is None or self._residency.tier(entry.version.key) == "device":
                    continue
            try:
                self._to_device(entry, entry.version)
            except LoragError as error:
                log.warning("pinned adapter %s not loaded: %s", pinned, error)

    # ---- requests ------------------------------------------------------------------------------
    def names(self, tenant: str) -> list[str]:
        with self._lock:
            return sorted(name for (owner, name) in self._entries if owner == tenant)

    async def acquire(self, tenant: str, name: str) -> AdapterLease:
        """Hold the current version of ``tenant/name`` for one request, loading it onto the device first.

        Raises:
            NotFound: no such adapter for this tenant.  ServerBusy: no device slot freed in time.
            Conflict/LoragError: this server cannot load adapters, or the load failed.
        """
        entry = self._entry(tenant, name)
        with self._lock:
            version = entry.version
            version.users += 1
            entry.unloaded = False
            entry.stats.requests += 1
            entry.stats.last_used = time.time()
        if self.metrics is not None:
            self._metrics_for(entry, "requests").inc()
            self.metrics.last_used.labels(tenant, name).set(entry.stats.last_used)
        try:
            await asyncio.to_thread(self._to_device, entry, version)
        except BaseException:
            self._release(version)
            raise
        return AdapterLease(self, entry, version)

    def _release(self, version: _Version) -> None:
        with self._lock:
            version.users -= 1
            discard = version.retired and version.users == 0
            self._lock.notify_all()  # a load waiting for a device slot may proceed
        if discard:
            self._discarder.submit(self._discard, version)

    def _to_device(self, entry: _Entry, version: _Version) -> None:
        """Worker thread: disk -> host memory -> model device, evicting LRU unprotected adapters as needed."""
        if self.host is None:
            raise Conflict("this server's generator cannot load adapters (it is not a transformers/engine model)",
                           hint="serve a generative model (generation.model) to use adapters")
        key = version.key
        with version.lock:
            with self._lock:
                if self._residency.tier(key) == "device":
                    self._residency.touch(key)
                    return
            started = time.perf_counter()
            if version.host is None:
                version.host = read_host_adapter(version.checked, pinned=self.served.device.startswith("cuda"),
                                                 check_finite=not self.served.checks_finite)
                with self._lock:
                    self._residency.put(key, "host")
            deadline = time.monotonic() + self.settings.load_timeout_s
            with self._device_lock:
                with self._lock:
                    while (victims := self._residency.device_victims(key, protected=self._protected(key))) is None:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            raise ServerBusy(
                                f"adapter {entry.dir.tenant}/{entry.dir.name}: all {self.settings.max_resident} "
                                "adapter slots are held by running requests or pinned adapters",
                                hint="retry shortly, or raise adapters.max_resident",
                            )
                        self._lock.wait(remaining)
                for victim in victims:
                    self.host.unload_adapter(victim)
                    self._demote(victim)
                self.host.load_adapter(key, version.host)
                elapsed = time.perf_counter() - started
                with self._lock:
                    self._residency.put(key, "device")
                    entry.stats.load_time_ms = elapsed * 1000
                    dropped = self._residency.host_victims(protected=self._protected(key))
                    for victim in dropped:
                        self._residency.drop(victim)
                        if victim in self._versions:
                            self._versions[victim].host = None
        self._event("load")
        if self.metrics is not None:
            self.metrics.load_seconds.labels(entry.dir.tenant).observe(elapsed)
        log.info("adapter %s loaded onto %s in %.1f ms", key, self.served.device, elapsed * 1000)
        for ident in {(entry.dir.tenant, entry.dir.name)} | {self._ident_of(k) for k in victims + dropped}:
            if ident is not None:
                self._set_residency_metric(ident)

    def _demote(self, key: str) -> None:
        with self._lock:
            version = self._versions.get(key)
            if version is None or version.retired:
                self._residency.drop(key)
                if version is not None:
                    version.host = None
            else:
                self._residency.put(key, "host")
        self._event("evict")
        log.info("adapter %s evicted from the device to host memory (LRU)", key)

    def _protected(self, loading: str) -> set[str]:
        """Keys that must stay on the device: in use, pinned, or the one being loaded (call under the lock)."""
        pinned = set(self.settings.pinned)
        keys = {loading} | {key for key, version in self._versions.items() if version.users}
        keys |= {entry.version.key for ident, entry in self._entries.items() if "/".join(ident) in pinned}
        return keys

    def _ident_of(self, key: str) -> tuple[str, str] | None:
        version = self._versions.get(key)
        return None if version is None else (version.checked.tenant, version.checked.name)

    def _entry(self, tenant: str, name: str) -> _Entry:
        with self._lock:
            entry = self._entries.get((tenant, name))
        if entry is None:
            raise NotFound(f"tenant {tenant!r} has no adapter {name!r}", hint="GET /v1/adapters lists yours")
        return entry

    # ---- management ----------------------------------------------------------------------------
    def view(self, tenant: str, name: str, *, default: str | None = None) -> dict:
        entry = self._entry(tenant, name)
        with self._lock:
            tier = self._residency.tier(entry.version.key)
        checked = entry.version.checked
        manifest = checked.manifest
        residency = {"device": "gpu", "host": "host"}.get(tier) or ("unloaded" if entry.unloaded else "disk")
        metrics = {} if manifest is None or manifest.metrics is None else manifest.metrics.model_dump(exclude_none=True)
        created = manifest.created_at if manifest is not None else _mtime_iso(checked.path)
        stats = entry.stats
        return {
            "id": name, "object": "adapter", "name": name, "tenant": tenant, "version": checked.version,
            "base_model": _base_model_name(manifest.base_model if manifest
                                           else checked.peft_config.get("base_model_name_or_path")),
            "method": checked.method, "rank": checked.rank, "metrics": metrics,
            "residency": residency, "device": self.served.device if self.served and tier == "device" else None,
            "pinned": f"{tenant}/{name}" in self.settings.pinned, "default": name == default,
            "loss_plot_url": f"/v1/adapters/{name}/loss.png" if (checked.path / LOSS_PLOT).is_file() else None,
            "created_at": created, "load_time_ms": stats.load_time_ms,
            "last_used": _iso(stats.last_used), "requests": stats.requests, "tokens": stats.tokens,
            "prompt_format": manifest.prompt_format if manifest else None,
            "warnings": [warning] if (warning := prompt_format_warning(manifest)) else [],
        }

    def views(self, tenant: str, *, default: str | None = None) -> list[dict]:
        views = []
        for name in self.names(tenant):
            try:
                views.append(self.view(tenant, name, default=default))
            except NotFound:  # removed between the listing and now
                continue
        return views

    def loss_plot(self, tenant: str, name: str) -> Path:
        path = self._entry(tenant, name).version.checked.path / LOSS_PLOT
        if not path.is_file():
            raise NotFound(f"adapter {name!r} has no loss plot (it was not trained with `lorag train`)")
        return path

    def load(self, tenant: str, name: str) -> None:
        """Blocking: put the adapter on the model device now (POST .../load)."""
        entry = self._entry(tenant, name)
        with self._lock:
            entry.unloaded = False
        self._to_device(entry, entry.version)

    def unload(self, tenant: str, name: str) -> None:
        """Blocking: take the adapter off the device and out of host memory (POST .../unload).

        Raises:
            Conflict: the adapter is pinned or used by running requests.
        """
        entry = self._entry(tenant, name)
        key = entry.version.key
        if f"{tenant}/{name}" in self.settings.pinned:
            raise Conflict(f"adapter {name!r} is pinned (adapters.pinned) and cannot be unloaded")
        with self._device_lock:
            with self._lock:
                if entry.version.users:
                    raise Conflict(f"adapter {name!r} is used by {entry.version.users} running request(s); unload it later")
                tier = self._residency.tier(key)
                self._residency.drop(key)
                entry.version.host = None
                entry.unloaded = True
            if tier == "device" and self.host is not None:
                self.host.unload_adapter(key)
        self._event("unload")
        log.info("adapter %s unloaded on request", key)
        self._set_residency_metric((tenant, name))

    def delete(self, tenant: str, name: str) -> None:
        """Blocking: remove the adapter from disk; running requests finish on the version they hold."""
        self._entry(tenant, name)
        self.registry.remove(tenant, name)
        self.refresh()

    def check_upload_header(self, name: str) -> Callable[[dict], None]:
        """The check an upload's weights header must pass before its data is written (shapes for the served
        model, ranks), as a callable for adapters.archive."""
        return lambda header: check_weights_header(name, header, self.served, self.settings.max_rank)

    def check_can_register(self, name: str) -> None:
        """The checks that need no files: run them before receiving or unpacking an upload.

        Raises:
            InvalidAdapter: a name that could escape the registry. Conflict: this generator serves no adapters.
        """
        validate_adapter_name(name)
        if self.served is None:
            raise Conflict("this server's generator cannot serve adapters, so none can be registered")

    def register(self, tenant: str, name: str, source: Path, *, overwrite: bool = False, runtime: bool = False) -> dict:
        """Blocking: validate the adapter dir ``source`` and copy it into the tenant's registry.

        A plain peft dir gets a ``lorag_adapter.json`` written from its config (after it passed the checks).
        Files lorag never loads are not copied if they are pickles (an HF Trainer's ``training_args.bin``).
        ``runtime``: added by vLLM's load_lora_adapter, which its unload_lora_adapter may remove again.

        Raises:
            InvalidAdapter/Conflict: it failed validation (nothing changes), or ``name`` exists and not ``overwrite``.
        """
        self.check_can_register(name)
        try:
            checked = self._check(source, tenant=tenant, name=name)
            check_finite_weights(checked)  # refused now, not when a request first loads it
            extra = {}
            if checked.manifest is None:
                extra[MANIFEST_FILE] = _manifest_for_plain(checked, self.served).model_dump_json(indent=2).encode()
        except (TypeError, ValueError, AttributeError) as error:  # a malformed config
            self._event("reject")
            raise InvalidAdapter(f"adapter {name!r}: malformed adapter_config.json ({_short(error)})") from error
        except CheckUnavailable:  # not the adapter's fault (the check could not run): no rejection to count
            raise
        except LoragError as error:
            self._event("reject")
            log.warning("adapter %s/%s rejected: %s", tenant, name, error)
            raise
        if runtime:
            extra[RUNTIME_FILE] = b'{"added_by": "POST /v1/load_lora_adapter"}\n'
        with self._register_lock:  # two uploads at once must not both fit into the last free quota
            if self.quotas is not None:
                new_bytes = tree_bytes(source) + sum(map(len, extra.values()))
                check_adapter_quota(self.quotas, self.data_dir, tenant, name, new_bytes=new_bytes)
            self.registry.write(tenant, name, source, overwrite=overwrite, extra=extra, leave_out=is_pickle)
        self.refresh()
        return self.view(tenant, name)

    # ---- vLLM's runtime LoRA API -----------------------------------------------------------------
    def load_lora_adapter(self, tenant: str, name: str, source: Path, *, load_inplace: bool = False) -> None:
        """Blocking: vLLM's POST /v1/load_lora_adapter: add ``source`` as ``name`` and load it.

        The copy lives in the tenant's registry, so unlike vLLM's it is still there after a restart.

        Raises:
            InvalidRequest: ``name`` is already loaded and not ``load_inplace`` (vLLM's 400).
            InvalidAdapter/Conflict: the dir failed validation (nothing changes).
            Whatever ``load`` raises (busy, a remote server refusing it): a new name is removed again, so the
            adapter is not listed and a retry is not told it "has already been loaded".
        """
        existed = name in self.names(tenant)
        if existed and not load_inplace:
            raise InvalidRequest(
                f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in place, "
                "set 'load_inplace' to True.", param="lora_name")
        self.register(tenant, name, source, overwrite=load_inplace, runtime=True)
        try:
            self.load(tenant, name)
        except BaseException:
            if not existed:
                self.delete(tenant, name)
            raise

    def unload_lora_adapter(self, tenant: str, name: str) -> None:
        """Blocking: vLLM's POST /v1/unload_lora_adapter: the adapter stops being listed and served (its
        registry copy is removed; the dir it was loaded from is never touched). Running requests finish on it.

        Raises:
            NotFound: no such adapter (vLLM's 404).  Conflict: it was trained or uploaded, not runtime-loaded.
        """
        with self._lock:
            entry = self._entries.get((tenant, name))
        if entry is None:
            raise NotFound(f"The lora adapter '{name}' cannot be found.")
        if not (entry.dir.path / RUNTIME_FILE).is_file():
            raise Conflict(
                f"adapter {name!r} was trained or uploaded, not added with /v1/load_lora_adapter, so "
                "unload_lora_adapter leaves it alone",
                hint=f"POST /v1/adapters/{name}/unload frees its memory; DELETE /v1/adapters/{name} removes it")
        self.delete(tenant, name)

    # ---- observability -------------------------------------------------------------------------
    def _event(self, event: str) -> None:
        if self.metrics is not None:
            self.metrics.events.labels(event).inc()

    def _metrics_for(self, entry: _Entry, metric: str):
        return getattr(self.metrics, metric).labels(entry.dir.tenant, entry.dir.name)

    def _set_residency_metric(self, ident: tuple[str, str]) -> None:
        if self.metrics is None:
            return
        try:
            residency = self.view(*ident)["residency"]
        except NotFound:
            return
        self.metrics.residency.labels(*ident).set(_RESIDENCY_LEVEL[residency])


def _manifest_for_plain(checked: CheckedAdapter, served) -> AdapterManifest:
    config = checked.peft_config
    return AdapterManifest(
        name=checked.name, tenant=checked.tenant, base_model=config.get("base_model_name_or_path") or served.name,
        base_fingerprint=served.fingerprint, method=checked.method,
        lora=LoraSpec(rank=checked.rank, alpha=config.get("lora_alpha", 8), dropout=config.get("lora_dropout", 0.0),
                      target_modules=config.get("target_modules") or "all-linear",
                      use_rslora=bool(config.get("use_rslora")), use_dora=bool(config.get("use_dora"))),
        hyperparameters={"registered_from": "plain peft directory"},
    )


def _short(error: BaseException) -> str:
    text = str(error)
    return text if len(text) <= 200 else text[:197] + "..."


def _base_model_name(base) -> str | None:
    # Tenants see the base by its id or last path part: a server path stays on the server.
    return public_model_name(base) if isinstance(base, str) and base else None


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


def _mtime_iso(path: Path) -> str | None:
    try:
        return _iso(path.stat().st_mtime)
    except OSError:
        return None
