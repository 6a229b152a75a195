"""The adapter dirs on disk (``<data_dir>/tenants/<t>/adapters/<name>/``): what is there now, and writes into it.

``scan()`` is cheap (stat calls only); its stamps change whenever a dir is replaced, rewritten or touched,
so the server re-validates just the adapters that changed.
"""

import shutil
from dataclasses import dataclass
from pathlib import Path

from core.datadir import adapters_dir
from adapters.manifest import remove_adapter_dir, write_adapter_dir


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
        return adapters_dir(self.data_dir, tenant) / name

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
                if path.name.startswith(".") or not path.is_dir() or path.is_symlink():
                    continue
                try:
                    found[(tenant_dir.name, path.name)] = AdapterDir(tenant_dir.name, path.name, path, _stamp(path))
                except OSError:  # removed while we looked: the next scan will not see it
                    continue
        return found

    def write(self, tenant: str, name: str, source: Path, *, overwrite: bool, extra: dict[str, bytes] | None = None) -> Path:
        """Copy the files of ``source`` (plus ``extra`` name -> bytes) into the registry atomically.

        Raises:
            Conflict: the adapter exists and ``overwrite`` is false.
        """

        def fill(directory: Path) -> None:
            for item in Path(source).iterdir():
                if item.is_file() and not item.is_symlink():
                    shutil.copyfile(item, directory / item.name)
            for file_name, data in (extra or {}).items():
                (directory / file_name).write_bytes(data)

        return write_adapter_dir(self.path(tenant, name), fill, overwrite=overwrite)

    def remove(self, tenant: str, name: str) -> None:
        remove_adapter_dir(self.path(tenant, name))


def _stamp(path: Path) -> tuple:
    stat = path.stat()
    parts = [(path.name, stat.st_ino, stat.st_mtime_ns)]
    for item in sorted(path.iterdir()):
        item_stat = item.lstat()
        parts.append((item.name, item_stat.st_ino, item_stat.st_size, item_stat.st_mtime_ns))
    return tuple(parts)
