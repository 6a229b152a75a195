"""Unpacks an uploaded adapter archive (.tar.gz / .tgz / .tar / .zip) without trusting it.

Refused: absolute paths, '..', links and device files, more than ``MAX_MEMBERS`` entries, more than
``max_bytes`` unpacked. The adapter files may sit at the top or inside one top-level directory.
"""

import shutil
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from adapters.registry import InvalidAdapter

MAX_MEMBERS = 64


def extract_adapter_archive(archive: Path, filename: str, dest: Path, *, max_bytes: int) -> Path:
    """Unpack ``archive`` (uploaded as ``filename``) into the empty dir ``dest``; returns the adapter dir.

    Raises:
        InvalidAdapter: an unknown format, an unsafe member, or too much data.
    """
    lower = filename.lower()
    if lower.endswith(".zip"):
        _extract_zip(archive, filename, dest, max_bytes=max_bytes)
    elif lower.endswith((".tar.gz", ".tgz", ".tar")):
        _extract_tar(archive, filename, dest, max_bytes=max_bytes)
    else:
        raise InvalidAdapter(f"upload {filename!r}: expected a .tar.gz, .tgz, .tar or .zip archive of the adapter dir")
    entries = [p for p in dest.iterdir()]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return dest


def _safe_name(filename: str, member: str) -> PurePosixPath:
    path = PurePosixPath(member)
    if path.is_absolute() or member.startswith(("/", "\\")) or ".." in path.parts or "\\" in member or ":" in member:
        raise InvalidAdapter(f"upload {filename!r}: member {member!r} has an absolute or escaping path")
    if len([part for part in path.parts if part not in ("", ".")]) > 2:
        raise InvalidAdapter(f"upload {filename!r}: member {member!r} is nested too deep (adapter dirs are flat)")
    return path


def _extract_tar(archive: Path, filename: str, dest: Path, *, max_bytes: int) -> None:
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            if len(members) > MAX_MEMBERS:
                raise InvalidAdapter(f"upload {filename!r}: {len(members)} members, more than {MAX_MEMBERS}")
            total = 0
            for member in members:
                path = _safe_name(filename, member.name)
                if member.isdir():
                    (dest / path).mkdir(parents=True, exist_ok=True)
                    continue
                if not member.isfile():
                    raise InvalidAdapter(f"upload {filename!r}: member {member.name!r} is a link or special file")
                total += member.size
                if total > max_bytes:
                    raise InvalidAdapter(f"upload {filename!r}: more than adapters.max_upload_bytes={max_bytes} unpacked")
                target = dest / path
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                with source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out)
    except (FileExistsError, IsADirectoryError, NotADirectoryError) as error:
        raise _member_clash(filename, error) from error
    except (tarfile.TarError, EOFError, OSError) as error:
        raise InvalidAdapter(f"upload {filename!r} is not a readable tar archive: {error}") from error


def _extract_zip(archive: Path, filename: str, dest: Path, *, max_bytes: int) -> None:
    try:
        with zipfile.ZipFile(archive) as bundle:
            infos = bundle.infolist()
            if len(infos) > MAX_MEMBERS:
                raise InvalidAdapter(f"upload {filename!r}: {len(infos)} members, more than {MAX_MEMBERS}")
            total = 0
            for info in infos:
                path = _safe_name(filename, info.filename)
                if (info.external_attr >> 16) & 0o170000 == 0o120000:  # a symlink stored by unix zip
                    raise InvalidAdapter(f"upload {filename!r}: member {info.filename!r} is a symbolic link")
                if info.is_dir():
                    (dest / path).mkdir(parents=True, exist_ok=True)
                    continue
                target = dest / path
                target.parent.mkdir(parents=True, exist_ok=True)
                with bundle.open(info) as source, open(target, "wb") as out:
                    # Count what is really inflated, not the header's claim (zip bombs lie about sizes).
                    while block := source.read(1 << 20):
                        total += len(block)
                        if total > max_bytes:
                            raise InvalidAdapter(
                                f"upload {filename!r}: more than adapters.max_upload_bytes={max_bytes} unpacked"
                            )
                        out.write(block)
    except (FileExistsError, IsADirectoryError, NotADirectoryError) as error:
        raise _member_clash(filename, error) from error
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError) as error:
        # RuntimeError: an encrypted member; NotImplementedError: an unsupported compression method
        raise InvalidAdapter(f"upload {filename!r} is not a readable zip archive: {error}") from error


def _member_clash(filename: str, error: OSError) -> InvalidAdapter:
    """Two members want the same path (a file and a folder): name the member, never the server's path."""
    member = Path(error.filename or "").name or "?"
    return InvalidAdapter(f"upload {filename!r} has conflicting members at {member!r} (a file and a folder, or twice)")
