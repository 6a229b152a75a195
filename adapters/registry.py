"""The one owner of a tenant's adapter directories (``<data_dir>/tenants/<t>/adapters/<name>/``).

One name rule, one listing and every write or removal go through here: ``lorag train`` and
``lorag adapters`` on one side, the server's hot-swap service and catalog on the other.
``scan()`` is cheap (stat calls only); its stamps change whenever a dir is replaced, rewritten or touched,
so the server re-validates just the adapters that changed.
"""

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from adapters.manifest import MANIFEST_FILE, AdapterManifest, read_manifest, remove_adapter_dir, write_adapter_dir
from core.datadir import adapters_dir
from core.errors import LoragError, NotFound

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class InvalidAdapter(LoragError):
    """An adapter that cannot be served as it is; the message names the file or field and the reason."""

    http_status = 422
    code = "invalid_adapter"


def validate_adapter_name(name: str) -> str:
    """Return ``name`` if it can be a directory name in the registry.

    Raises:
        InvalidAdapter: names that could escape the registry dir ('/', '..', leading '.'), empty or too long.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise InvalidAdapter(
            f"invalid adapter name {name!r}: use 1-63 letters, digits, '.', '-' and '_', starting with a letter "
            "or digit, without '..'",
        )
    return name


@dataclass(frozen=True)
class AdapterDir:
    tenant: str
    name: str
    path: Path
    stamp: tuple  # (inode, size, mtime_ns) of the dir and every file in it


class AdapterRegistry:
    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)

    def path(self, tenant: str, name: str) -> Path:
        """Where adapter ``tenant/name`` lives (whether or not it exists yet).

        Raises:
            InvalidAdapter: a name outside the registry's rule.  LoragError: an invalid tenant name.
        """
        return adapters_dir(self.data_dir, tenant) / validate_adapter_name(name)

    def existing(self, tenant: str, name: str) -> Path:
        """The directory of adapter ``tenant/name``.

        Raises:
            NotFound: no such adapter for this tenant.
        """
        path = self.path(tenant, name)
        if not path.is_dir() or path.is_symlink():
            raise NotFound(f"tenant {tenant!r} has no adapter {name!r}", hint="See `lorag adapters list --tenant T`")
        return path

    def scan(self) -> dict[tuple[str, str], AdapterDir]:
        """Every adapter dir of every tenant; names starting with '.' are writes in progress and skipped."""
        found = {}
        tenants = self.data_dir / "tenants"
        if not tenants.is_dir():
            return found
        for tenant_dir in sorted(tenants.iterdir()):
            root = tenant_dir / "adapters"
            if not root.is_dir():
                continue
            for path in sorted(root.iterdir()):
                if not _listed(path):
                    continue
                try:
                    found[(tenant_dir.name, path.name)] = AdapterDir(tenant_dir.name, path.name, path, _stamp(path))
                except OSError:  # removed while we looked: the next scan will not see it
                    continue
        return found

    def names(self, tenant: str, *, with_manifest: bool = False) -> list[str]:
        """The tenant's adapter dir names, sorted; ``with_manifest`` keeps only those ``lorag train`` wrote."""
        root = adapters_dir(self.data_dir, tenant)
        if not root.is_dir():
            return []
        return sorted(path.name for path in root.iterdir()
                      if _listed(path) and (not with_manifest or (path / MANIFEST_FILE).is_file()))

    def list(self, tenant: str) -> list[AdapterManifest]:
        """The manifests of the tenant's adapters, newest first; unreadable ones are logged and left out."""
        manifests = []
        for name in self.names(tenant):
            try:
                manifests.append(read_manifest(adapters_dir(self.data_dir, tenant) / name))
            except LoragError as error:
                log.warning("skipping adapter %s/%s: %s", tenant, name, error)
        return sorted(manifests, key=lambda m: m.created_at, reverse=True)

    def show(self, tenant: str, name: str) -> AdapterManifest:
        """Raises: NotFound (no such adapter or no manifest), LoragError (an unreadable manifest)."""
        return read_manifest(self.existing(tenant, name))

    def write(self, tenant: str, name: str, source: Path, *, overwrite: bool, extra: dict[str, bytes] | None = None,
              leave_out=lambda path: False) -> Path:
        """Copy the files of ``source`` (plus ``extra`` name -> bytes) into the registry atomically; files for
        which ``leave_out(path)`` is true (pickles nobody may load) are not copied.

        Raises:
            Conflict: the adapter exists and ``overwrite`` is false.
        """

        def fill(directory: Path) -> None:
            for item in Path(source).iterdir():
                if item.is_file() and not item.is_symlink() and not leave_out(item):
                    shutil.copyfile(item, directory / item.name)
            for file_name, data in (extra or {}).items():
                (directory / file_name).write_bytes(data)

        return write_adapter_dir(self.path(tenant, name), fill, overwrite=overwrite)

    def remove(self, tenant: str, name: str) -> None:
        """Unregister and delete adapter ``tenant/name``.

        Raises:
            NotFound: no such adapter for this tenant.
        """
        remove_adapter_dir(self.existing(tenant, name))


def _listed(path: Path) -> bool:
    """Whether a dir entry is an adapter: not a write in progress ('.' names), not a file, not a link."""
    return not path.name.startswith(".") and path.is_dir() and not path.is_symlink()


def _stamp(path: Path) -> tuple:
    stat = path.stat()
    parts = [(path.name, stat.st_ino, stat.st_mtime_ns)]
    for item in sorted(path.iterdir()):
        item_stat = item.lstat()
        parts.append((item.name, item_stat.st_ino, item_stat.st_size, item_stat.st_mtime_ns))
    return tuple(parts)
