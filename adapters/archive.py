"""Unpacks an uploaded adapter archive (.tar.gz / .tgz / .tar / .zip) without trusting it.

Only the files an adapter dir holds are written (``ADAPTER_FILES``); any other member is skipped unread, so an
archive cannot store arbitrary data on the server (a pickle checkpoint is refused by name: lorag never loads one). Refused: absolute paths, '..', links and device files, more
than ``MAX_MEMBERS`` entries, a file over its own limit, more than ``max_bytes`` unpacked in all, and a weights
file whose size disagrees with its safetensors header (checked, with ``check_header``, before any weight byte is
written). The adapter files may sit at the top or inside one top-level directory.
"""

import json
import struct
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from adapters.peft_files import CONFIG_FILE, MAX_CONFIG_BYTES, PICKLE_SUFFIXES, WEIGHTS_FILE
from adapters.registry import InvalidAdapter

MAX_MEMBERS = 64
_SAFETENSORS_MAX_HEADER = 100 * 2**20  # the format's own limit
# What an adapter dir holds (peft's two files, lorag train's manifest, loss plot and log), each with its own cap;
# the weights are capped by max_bytes and their header.
ADAPTER_FILES = {
    CONFIG_FILE: MAX_CONFIG_BYTES,
    WEIGHTS_FILE: None,
    "lorag_adapter.json": MAX_CONFIG_BYTES,
    "loss.png": 8 * 2**20,
    "train_log.jsonl": 16 * 2**20,
}
HeaderCheck = Callable[[dict], None]


@dataclass(frozen=True)
class _Member:
    name: str  # as stored in the archive
    path: PurePosixPath  # checked: relative, no '..'
    size: int  # as the archive declares it (a zip may lie; what is read is counted too)
    is_dir: bool
    open: Callable[[], AbstractContextManager[BinaryIO]]


def extract_adapter_archive(
    archive: Path, filename: str, dest: Path, *, max_bytes: int, check_header: HeaderCheck | None = None
) -> Path:
    """Unpack the adapter files of ``archive`` (uploaded as ``filename``) into the empty dir ``dest``; returns the
    adapter dir. ``check_header`` is called with the weights' safetensors header (a dict) before the weights are
    written, and raises to refuse them.

    Raises:
        InvalidAdapter: an unknown format, an unsafe member, too much data, or a weights file whose header does not
            match its size.
    """
    lower = filename.lower()
    if lower.endswith(".zip"):
        members = _zip_members
    elif lower.endswith((".tar.gz", ".tgz", ".tar")):
        members = _tar_members
    else:
        raise InvalidAdapter(f"upload {filename!r}: expected a .tar.gz, .tgz, .tar or .zip archive of the adapter dir")
    total = 0
    try:
        for member in members(archive, filename):
            if member.is_dir:
                continue
            if member.path.suffix.lower() in PICKLE_SUFFIXES:  # said plainly rather than skipped: it was meant
                raise InvalidAdapter(
                    f"adapter file {member.path.name!r} is a pickle-based checkpoint, which lorag never loads; "
                    f"save the adapter as {WEIGHTS_FILE} (peft save_pretrained with safe_serialization=True)"
                )
            if member.path.name not in ADAPTER_FILES:
                continue  # not part of an adapter: never written
            limit = ADAPTER_FILES[member.path.name]
            if total + member.size > max_bytes:
                raise InvalidAdapter(f"upload {filename!r}: more than adapters.max_upload_bytes={max_bytes} unpacked")
            if limit is not None and member.size > limit:
                raise InvalidAdapter(
                    f"upload {filename!r}: {member.name!r} is {member.size} bytes, over its limit of {limit}"
                )
            target = dest / member.path
            target.parent.mkdir(parents=True, exist_ok=True)
            with member.open() as source, open(target, "xb") as out:
                if member.path.name == WEIGHTS_FILE:
                    total = _copy_weights(source, out, member, filename, total, max_bytes, check_header)
                else:
                    total = _copy(source, out, filename, total, max_bytes, limit=member.size)
    except (FileExistsError, IsADirectoryError, NotADirectoryError) as error:
        raise _member_clash(filename, error) from error
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError) as error:
        # RuntimeError: an encrypted zip member; NotImplementedError: an unsupported compression method
        raise InvalidAdapter(f"upload {filename!r} is not a readable archive: {error}") from error
    entries = [p for p in dest.iterdir()]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return dest


def _copy(source: BinaryIO, out: BinaryIO, filename: str, total: int, max_bytes: int, *, limit: int) -> int:
    """Copy, counting what is really read (zip bombs lie about sizes); returns the new running total."""
    written = 0
    while block := source.read(1 << 20):
        written += len(block)
        total += len(block)
        if total > max_bytes:
            raise InvalidAdapter(f"upload {filename!r}: more than adapters.max_upload_bytes={max_bytes} unpacked")
        if written > limit:
            raise InvalidAdapter(f"upload {filename!r}: a member holds more bytes than its header declares")
        out.write(block)
    return total


def _copy_weights(source: BinaryIO, out: BinaryIO, member: _Member, filename: str, total: int, max_bytes: int,
                  check_header: HeaderCheck | None) -> int:
    """Read the safetensors header first and refuse a size that disagrees with it (or a header ``check_header``
    refuses) before a single data byte is written."""
    where = f"upload {filename!r}: {WEIGHTS_FILE}"
    prefix = source.read(8)
    if len(prefix) < 8:
        raise InvalidAdapter(f"{where} is too short for a safetensors file")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > _SAFETENSORS_MAX_HEADER or 8 + header_len > member.size:
        raise InvalidAdapter(f"{where} has a header length of {header_len} bytes in a file of {member.size}")
    header_bytes = source.read(header_len)
    try:
        header = json.loads(header_bytes)
    except (ValueError, RecursionError) as error:
        raise InvalidAdapter(f"{where} header is not valid JSON: {error}") from error
    if not isinstance(header, dict):
        raise InvalidAdapter(f"{where} header is not a JSON object")
    data_end = 0
    for key, spec in header.items():
        if key == "__metadata__":
            continue
        offsets = spec.get("data_offsets") if isinstance(spec, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
            raise InvalidAdapter(f"{where} tensor {key!r} has malformed data_offsets")
        data_end = max(data_end, offsets[1])
    declared = 8 + header_len + data_end
    if declared != member.size:
        raise InvalidAdapter(
            f"{where} is {member.size} bytes but its header describes {declared} (tensors end at {data_end})"
        )
    if check_header is not None:
        check_header(header)
    out.write(prefix)
    out.write(header_bytes)
    return _copy(source, out, filename, total + 8 + header_len, max_bytes, limit=data_end)


def _safe_name(filename: str, member: str) -> PurePosixPath:
    path = PurePosixPath(member)
    if path.is_absolute() or member.startswith(("/", "\\")) or ".." in path.parts or "\\" in member or ":" in member:
        raise InvalidAdapter(f"upload {filename!r}: member {member!r} has an absolute or escaping path")
    if len([part for part in path.parts if part not in ("", ".")]) > 2:
        raise InvalidAdapter(f"upload {filename!r}: member {member!r} is nested too deep (adapter dirs are flat)")
    return path


def _tar_members(archive: Path, filename: str) -> Iterator[_Member]:
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        if len(members) > MAX_MEMBERS:
            raise InvalidAdapter(f"upload {filename!r}: {len(members)} members, more than {MAX_MEMBERS}")
        for member in members:
            path = _safe_name(filename, member.name)
            if not member.isdir() and not member.isfile():
                raise InvalidAdapter(f"upload {filename!r}: member {member.name!r} is a link or special file")
            yield _Member(member.name, path, member.size, member.isdir(),
                          lambda member=member: tar.extractfile(member))


def _zip_members(archive: Path, filename: str) -> Iterator[_Member]:
    with zipfile.ZipFile(archive) as bundle:
        infos = bundle.infolist()
        if len(infos) > MAX_MEMBERS:
            raise InvalidAdapter(f"upload {filename!r}: {len(infos)} members, more than {MAX_MEMBERS}")
        for info in infos:
            path = _safe_name(filename, info.filename)
            if (info.external_attr >> 16) & 0o170000 == 0o120000:  # a symlink stored by unix zip
                raise InvalidAdapter(f"upload {filename!r}: member {info.filename!r} is a symbolic link")
            yield _Member(info.filename, path, info.file_size, info.is_dir(), lambda info=info: bundle.open(info))


def _member_clash(filename: str, error: OSError) -> InvalidAdapter:
    """Two members want the same path (a file and a folder): name the member, never the server's path."""
    member = Path(error.filename or "").name or "?"
    return InvalidAdapter(f"upload {filename!r} has conflicting members at {member!r} (a file and a folder, or twice)")
