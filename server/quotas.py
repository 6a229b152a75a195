"""Per-tenant storage quotas (``quotas.*``): how many adapters and uploaded documents a tenant keeps, and their bytes.

Checked before anything is written, from what is on disk now: a count over its limit is a 409 (delete something
first), bytes over theirs a 413.
"""

from pathlib import Path

from core.datadir import adapters_dir, uploads_dir
from core.errors import Conflict, LoragError


class QuotaCountExceeded(Conflict):
    code = "quota_exceeded"


class QuotaBytesExceeded(LoragError):
    http_status = 413
    code = "quota_exceeded"


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path`` (links not followed); 0 when it does not exist."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for item in path.rglob("*") if path.is_dir() else ():
        try:
            if item.is_file() and not item.is_symlink():
                total += item.stat().st_size
        except OSError:  # removed while we counted
            continue
    return total


def check_adapter_quota(quotas, data_dir: Path, tenant: str, name: str, *, new_bytes: int) -> None:
    """Refuse adding (or replacing) adapter ``name`` of ``new_bytes`` when the tenant would go over its quota.

    Raises:
        QuotaCountExceeded: a new adapter beyond ``quotas.max_adapters``.
        QuotaBytesExceeded: the tenant's adapters would hold more than ``quotas.max_adapter_bytes``.
    """
    root = adapters_dir(data_dir, tenant)
    existing = {p.name: p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")} if root.is_dir() else {}
    if quotas.max_adapters and name not in existing and len(existing) >= quotas.max_adapters:
        raise QuotaCountExceeded(
            f"tenant {tenant!r} has {len(existing)} adapters, the limit (quotas.max_adapters)",
            hint="delete one with DELETE /v1/adapters/{name} first",
        )
    if quotas.max_adapter_bytes:
        kept = sum(tree_bytes(path) for other, path in existing.items() if other != name)
        if kept + new_bytes > quotas.max_adapter_bytes:
            raise QuotaBytesExceeded(
                f"adapter {name!r} ({new_bytes} bytes) would bring tenant {tenant!r} to {kept + new_bytes} bytes of "
                f"adapters, over quotas.max_adapter_bytes={quotas.max_adapter_bytes}",
                hint="delete adapters you no longer need",
            )


def check_upload_quota(quotas, data_dir: Path, tenant: str, names: list[str], *, new_bytes: int) -> None:
    """Refuse saving the uploads ``names`` (``new_bytes`` in all) when the tenant would go over its quota;
    a name already uploaded replaces that file.

    Raises:
        QuotaCountExceeded: more than ``quotas.max_uploads`` documents.
        QuotaBytesExceeded: more than ``quotas.max_upload_bytes`` bytes of uploads.
    """
    root = uploads_dir(data_dir, tenant)
    existing = ({p.name: p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")}
                if root.is_dir() else {})
    count = len(set(existing) | set(names))
    if quotas.max_uploads and count > quotas.max_uploads and len(set(names) - set(existing)) > 0:
        raise QuotaCountExceeded(
            f"tenant {tenant!r} would have {count} uploaded documents, over quotas.max_uploads={quotas.max_uploads}",
            hint="delete documents with DELETE /v1/documents/{id} first",
        )
    if quotas.max_upload_bytes:
        kept = sum(path.stat().st_size for other, path in existing.items() if other not in names)
        if kept + new_bytes > quotas.max_upload_bytes:
            raise QuotaBytesExceeded(
                f"these uploads ({new_bytes} bytes) would bring tenant {tenant!r} to {kept + new_bytes} bytes of "
                f"documents, over quotas.max_upload_bytes={quotas.max_upload_bytes}",
                hint="delete documents you no longer need",
            )
