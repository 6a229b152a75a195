"""The adapter directory contract: the ``lorag_adapter.json`` manifest, the base-model fingerprint, atomic writes.

Training writes adapter directories with :func:`write_adapter_dir`; the server validates them with
:func:`read_manifest` and :func:`check_base` before loading the weights.
"""

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.atomic import fsync_path
from core.datadir import PRIVATE_DIR_MODE, make_private_dir, make_private_file
from core.errors import Conflict, LoragError, NotFound
from core.prompt import PROMPT_FORMAT

FORMAT_VERSION = 1
MANIFEST_FILE = "lorag_adapter.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", MANIFEST_FILE)

# Only the fields that decide whether adapter weights fit a base model: two checkpoints of the same
# architecture in different dtypes (or under different names) share a fingerprint.
FINGERPRINT_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)


class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="allow")

    rank: int = Field(ge=1)
    alpha: float
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False


class DataStats(BaseModel):
    model_config = ConfigDict(extra="allow")

    file: str
    sha256: str
    format: str
    records: int  # records read from the file, good and bad
    skipped: int  # bad records left out (file:line:reason reported at training time)
    truncated: int  # examples cut at max_seq_len
    train: int
    val: int
    with_retrieval: bool = False


class TrainMetrics(BaseModel):
    model_config = ConfigDict(extra="allow")

    steps: int
    best_step: int | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    base_val_perplexity: float | None = None
    val_perplexity: float | None = None
    tokens_per_second: float | None = None
    peak_memory_bytes: int | None = None
    wall_time_s: float | None = None
    stopped_early: bool = False


class AdapterManifest(BaseModel):
    """What ``lorag_adapter.json`` holds. Unknown fields are kept so newer writers stay readable."""

    model_config = ConfigDict(extra="allow")

    format_version: int = FORMAT_VERSION
    name: str
    tenant: str
    base_model: str  # hub id or path the adapter was trained on
    base_fingerprint: str  # model_fingerprint() of that base's config
    method: Literal["lora", "qlora", "dora"]
    lora: LoraSpec
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    data: DataStats | None = None
    metrics: TrainMetrics | None = None
    versions: dict[str, str] = Field(default_factory=dict)
    # core.prompt.PROMPT_FORMAT the adapter was trained on; None: registered from a plain peft dir, or written
    # before lorag recorded it (then it was trained on prompt format 1)
    prompt_format: int | None = None
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def rank(self) -> int:
        return self.lora.rank


def model_fingerprint(config: Any) -> str:
    """A short hash of the architecture-defining fields of a model config (object or dict).

    Dtype, name and quantisation are left out on purpose: an adapter trained on a 4-bit or bf16 copy
    of a model fits every other copy of it.
    """
    if not isinstance(config, Mapping):
        text_config = getattr(config, "get_text_config", None)
        config = (text_config() if callable(text_config) else config).to_dict()
    values = {field: config.get(field) for field in FINGERPRINT_FIELDS}
    if values["num_key_value_heads"] is None:  # older configs omit it when it equals the head count
        values["num_key_value_heads"] = values["num_attention_heads"]
    digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()
    return f"sha256:{digest[:16]}"


def read_manifest(adapter_dir: str | Path) -> AdapterManifest:
    """Load and validate ``<adapter_dir>/lorag_adapter.json``.

    Raises:
        NotFound: the directory or its manifest does not exist.
        LoragError: the manifest is not JSON, has a bad or missing field, or a newer format version.
    """
    path = Path(adapter_dir) / MANIFEST_FILE
    if not path.is_file():
        raise NotFound(f"adapter manifest {str(path)!r} does not exist", hint="Train the adapter with `lorag train`")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:  # invalid JSON or UTF-8, a number too long, deep nesting
        raise LoragError(f"adapter manifest {str(path)!r} is not readable JSON: {error}") from error
    if not isinstance(raw, dict):
        raise LoragError(f"adapter manifest {str(path)!r} must hold a JSON object, not {type(raw).__name__}")
    version = raw.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise LoragError(
            f"adapter manifest {str(path)!r}: field 'format_version' is {version!r}; "
            f"this lorag reads format versions up to {FORMAT_VERSION}",
            hint="Upgrade lorag or retrain the adapter",
        )
    try:
        return AdapterManifest.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise LoragError(f"adapter manifest {str(path)!r}: field {field!r}: {first['msg']}") from error


def prompt_format_warning(manifest: AdapterManifest | None) -> str | None:
    """Why serving this adapter under today's prompt may go wrong, or None when its prompt format matches.

    An adapter learns the exact prompt it was trained on (system prompt, document layout, [n] markers); under
    another one it still loads, but answers may lose the format it learnt. Not a refusal: the weights fit.
    """
    if manifest is None or manifest.hyperparameters.get("registered_from") == "plain peft directory":
        return None  # not trained by lorag: no prompt of ours to compare with
    trained_on = manifest.prompt_format or 1
    if trained_on == PROMPT_FORMAT:
        return None
    return (
        f"adapter {manifest.tenant}/{manifest.name} was trained on prompt format {trained_on}, but this lorag "
        f"builds prompt format {PROMPT_FORMAT}; answers may not follow the format it learnt. Retrain it with "
        "`lorag train` to match"
    )


def check_base(manifest: AdapterManifest, config: Any) -> None:
    """Refuse to put an adapter on a base model of a different architecture.

    Raises:
        Conflict: the base model's fingerprint differs from the one the adapter was trained on.
    """
    fingerprint = model_fingerprint(config)
    if fingerprint != manifest.base_fingerprint:
        raise Conflict(
            f"adapter {manifest.tenant}/{manifest.name} was trained on {manifest.base_model!r} "
            f"(fingerprint {manifest.base_fingerprint}) but the base model has fingerprint {fingerprint}",
            hint=f"Serve it with {manifest.base_model!r} or retrain it on this base model",
        )


def write_manifest(directory: Path, manifest: AdapterManifest) -> None:
    """Write the manifest into a directory that is still being assembled (not yet registered)."""
    path = Path(directory) / MANIFEST_FILE
    path.write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")


def write_adapter_dir(
    target: str | Path, fill: Callable[[Path], None], *, overwrite: bool = False
) -> Path:
    """Create the adapter directory ``target`` all at once.

    ``fill(tmp_dir)`` writes every file into a temporary directory next to ``target`` (same file system);
    the files are fsynced and the directory renamed into place, so readers see either no adapter or a
    complete one. Names starting with "." are temporary and never listed as adapters.

    Raises:
        Conflict: ``target`` exists and ``overwrite`` is false.
        LoragError: ``fill`` did not write the adapter files.
    """
    target = Path(target)
    make_private_dir(target.parent)
    if target.exists() and not overwrite:
        raise Conflict(f"adapter {str(target)!r} already exists", hint="Pick another --name or delete it first")
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(mode=PRIVATE_DIR_MODE)
    os.chmod(tmp, PRIVATE_DIR_MODE)
    old = None
    try:
        fill(tmp)
        missing = [name for name in ADAPTER_FILES if not (tmp / name).is_file()]
        if missing:
            raise LoragError(f"adapter {str(target)!r} is incomplete: {', '.join(missing)} not written")
        for path in tmp.rglob("*"):
            if path.is_file():
                make_private_file(path)  # tenant data: owner-only, whatever wrote it (peft, shutil, matplotlib)
                fsync_path(path)
        fsync_path(tmp)
        if target.exists():  # rename() cannot replace a non-empty directory: move the old one aside first
            old = target.parent / f".old-{target.name}-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
        os.rename(tmp, target)
        fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not target.exists():  # the new one never arrived: keep the old one registered
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def remove_adapter_dir(target: str | Path) -> None:
    """Unregister an adapter atomically (rename out of the listing), then delete its files."""
    target = Path(target)
    trash = target.parent / f".deleted-{target.name}-{uuid.uuid4().hex[:8]}"
    os.rename(target, trash)
    fsync_path(target.parent)
    shutil.rmtree(trash, ignore_errors=True)

