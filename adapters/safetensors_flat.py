"""A safetensors file as one flat byte buffer with zero-copy tensor views.

``safetensors.torch.load`` copies every tensor; an adapter is hundreds of small tensors, and moving
them one by one to the GPU costs more than the file read. Keeping the file's data region as one
buffer lets a loader check and move all of it at once (one copy, one finiteness check per dtype),
then take views. The format is a little-endian u64 header length, a JSON header, then the data.
"""

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from core.errors import LoragError

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
_MAX_HEADER = 100 * 2**20  # the format's own limit


class InvalidSafetensors(LoragError):
    """The file is not a well-formed safetensors file; the message names it and the reason."""


class NonFiniteWeights(LoragError):
    """A tensor holds NaN or infinity (a diverged training run); the message names it."""

    http_status = 422
    code = "invalid_adapter"


@dataclass(frozen=True)
class Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offsets within the data region
    end: int


@dataclass(frozen=True)
class FlatTensors:
    """``data``: the file's data region (uint8, CPU or moved to a device); ``entries``: name -> layout."""

    data: torch.Tensor
    entries: dict[str, Entry]

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def to(self, device) -> "FlatTensors":
        """The same tensors on ``device``: one copy of the whole buffer."""
        return FlatTensors(self.data.to(device), self.entries)

    def views(self) -> dict[str, torch.Tensor]:
        """Every tensor as a view into ``data`` (no copy)."""
        return {name: self.view(name) for name in self.entries}

    def view(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        return self.data[entry.start : entry.end].view(entry.dtype).view(entry.shape)

    def first_non_finite(self) -> str | None:
        """Name of a floating-point tensor holding NaN or infinity, or None. One check per run of tensors
        of the same dtype lying back to back (usually the whole file), per tensor only to name the culprit."""
        runs: list[tuple[torch.dtype, int, int, list[str]]] = []
        for name, entry in sorted(self.entries.items(), key=lambda item: item[1].start):
            if not entry.dtype.is_floating_point or entry.end == entry.start:
                continue
            if runs and runs[-1][0] == entry.dtype and runs[-1][2] == entry.start:
                runs[-1] = (entry.dtype, runs[-1][1], entry.end, runs[-1][3] + [name])
            else:
                runs.append((entry.dtype, entry.start, entry.end, [name]))
        for dtype, start, end, names in runs:
            if not bool(torch.isfinite(self.data[start:end].view(dtype)).all()):
                return next(name for name in names if not bool(torch.isfinite(self.view(name)).all()))
        return None


def read_flat(path: Path, *, pinned: bool = False) -> FlatTensors:
    """Read ``path`` into one buffer and check its header against the data.

    ``pinned`` reads into page-locked memory from torch's caching host allocator (CUDA only): already
    mapped, so the read is one memcpy from the page cache instead of a page fault per 4 KiB, and the
    copy to the GPU runs at full speed.

    Raises:
        InvalidSafetensors: a truncated file, a bad header, an unknown dtype, or offsets that do not fit.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise InvalidSafetensors(f"{path}: too short for a safetensors file ({len(prefix)} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER:
                raise InvalidSafetensors(f"{path}: header length {header_len} is over the format's limit")
            header_bytes = handle.read(header_len)
            size = max(path.stat().st_size - 8 - header_len, 0) if len(header_bytes) == header_len else 0
            data = torch.empty(size, dtype=torch.uint8, pin_memory=pinned and size > 0)
            got = handle.readinto(memoryview(data.numpy())) if size else 0
    except OSError as error:
        raise InvalidSafetensors(f"cannot read {path}: {error}") from error
    if len(header_bytes) != header_len or got != size:
        raise InvalidSafetensors(f"{path}: the file is truncated")
    try:
        header = json.loads(header_bytes)
    except (ValueError, RecursionError) as error:  # invalid JSON or UTF-8, a number too long, deep nesting
        raise InvalidSafetensors(f"{path}: the header is not valid JSON: {error}") from error
    if not isinstance(header, dict):
        raise InvalidSafetensors(f"{path}: the header must be a JSON object")
    header.pop("__metadata__", None)
    entries = {name: _entry(path, name, spec, size) for name, spec in header.items()}
    spans = sorted((e.start, e.end, name) for name, e in entries.items())
    for (_, end, name), (start, _, following) in zip(spans, spans[1:]):
        if start < end:
            raise InvalidSafetensors(f"{path}: tensors {name!r} and {following!r} overlap")
    return FlatTensors(data, entries)


def _entry(path: Path, name: str, spec, data_len: int) -> Entry:
    if not isinstance(spec, dict) or spec.get("dtype") not in DTYPES:
        raise InvalidSafetensors(f"{path}: tensor {name!r} has an unsupported dtype "
                                 f"{spec.get('dtype') if isinstance(spec, dict) else spec!r}")
    dtype, shape, offsets = DTYPES[spec["dtype"]], spec.get("shape"), spec.get("data_offsets")
    if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
            or not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)):
        raise InvalidSafetensors(f"{path}: tensor {name!r} has a malformed shape or data_offsets")
    start, end = offsets
    itemsize = torch.empty(0, dtype=dtype).element_size()
    numel = 1
    for dim in shape:
        numel *= dim
    if not 0 <= start <= end <= data_len or end - start != numel * itemsize:
        raise InvalidSafetensors(f"{path}: tensor {name!r} data_offsets {offsets} do not fit its shape {shape} "
                                 f"and the file's {data_len} data bytes")
    if start % itemsize:
        raise InvalidSafetensors(f"{path}: tensor {name!r} is not aligned to its {spec['dtype']} elements")
    return Entry(dtype, tuple(shape), start, end)
