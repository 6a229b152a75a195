"""Checks an adapter directory against the served model before any weight is loaded.

Safetensors only (pickle files are refused), the base-model fingerprint, rank, target modules and every
tensor's shape; a plain peft directory (no ``lorag_adapter.json``) must name the served model in
``adapter_config.json`` (``base_model_name_or_path``: its path or id, ``server.served_model_name``, one of
``adapters.base_model_aliases``, or a local model dir of the same architecture fingerprint).
"""

import hashlib
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from core.errors import Conflict, LoragError
from adapters.manifest import MANIFEST_FILE, AdapterManifest, model_fingerprint, read_manifest
from adapters.host import HostAdapter, ServedModel
from adapters.peft_files import CONFIG_FILE, WEIGHTS_FILE, check_files, read_config
from adapters.registry import InvalidAdapter, validate_adapter_name
from adapters.safetensors_flat import InvalidSafetensors, read_flat

FLOAT_DTYPES = ("F32", "F16", "BF16")
# peft's saved names: base_model.model.<module path>.lora_A.weight (the adapter name is stripped)
_TENSOR = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_magnitude_vector)(?:\.weight)?$")


@dataclass(frozen=True)
class CheckedAdapter:
    """A validated adapter version; ``version`` hashes its files, so any change gives a new one."""

    tenant: str
    name: str
    path: Path
    version: str
    manifest: AdapterManifest | None
    peft_config: dict
    rank: int
    weights_sha256: bytes
    weights_stat: tuple[int, int, int]  # size, mtime_ns, inode of the weights file when it was hashed

    @property
    def key(self) -> str:
        """The adapter's name inside the generator: unique per version, free of '.' (peft module names)."""
        return f"{self.tenant}:{self.name}@{self.version}".replace(".", "_")

    @property
    def method(self) -> str:
        if self.manifest is not None:
            return self.manifest.method
        return "dora" if self.peft_config.get("use_dora") else "lora"


def check_adapter_dir(
    path: Path, *, tenant: str, name: str, served: ServedModel | None, max_rank: int, max_bytes: int
) -> CheckedAdapter:
    """Validate ``path`` as adapter ``tenant/name`` for ``served`` (None: only the checks that need no model).

    Raises:
        InvalidAdapter: a bad name, a pickle or symlinked file, a missing/unreadable file, a rank over
            ``max_rank``, a target module or tensor shape that does not exist in the served model.
        Conflict: the adapter was trained on another base model.
    """
    validate_adapter_name(name)
    path = Path(path)
    check_files(path, name=name)
    weights_path = path / WEIGHTS_FILE
    size = weights_path.stat().st_size
    if size > max_bytes:
        raise InvalidAdapter(f"adapter {name!r}: {WEIGHTS_FILE} is {size} bytes, over the limit of {max_bytes}")
    config, config_bytes = read_config(path, name=name)
    manifest = read_manifest(path) if (path / MANIFEST_FILE).is_file() else None
    rank = _check_rank(name, config, manifest, max_rank)
    if served is not None:
        _check_base(name, config, manifest, served)
        _check_method(name, config, manifest, served)
        _check_targets(name, config, served)
    _check_tensors(name, weights_path, served, max_rank)
    digest = hashlib.sha256(f"{tenant}/{name}\0".encode())
    digest.update(config_bytes)
    if manifest is not None:
        digest.update((path / MANIFEST_FILE).read_bytes())
    weights_stat = _stat_identity(weights_path)
    weights_digest = _file_digest(weights_path)
    digest.update(weights_digest)
    return CheckedAdapter(tenant, name, path, digest.hexdigest()[:12], manifest, config, rank, weights_digest,
                          weights_stat)


def check_finite_weights(checked: CheckedAdapter) -> None:
    """Read the weights once and refuse NaN or infinity (a diverged training run), naming the tensor.

    Raises:
        InvalidAdapter: a non-finite tensor, or an unreadable file.
    """
    weights_path = checked.path / WEIGHTS_FILE
    try:
        flat = read_flat(weights_path)
    except InvalidSafetensors as error:  # named by file, not by the server's path (an upload's is a scratch dir)
        raise InvalidAdapter(f"adapter {checked.name!r}: {str(error).replace(str(weights_path), WEIGHTS_FILE)}") from error
    bad = flat.first_non_finite()
    if bad is not None:
        raise InvalidAdapter(f"adapter {checked.name!r}: {WEIGHTS_FILE} tensor {bad!r} has NaN or infinite values")


def read_host_adapter(checked: CheckedAdapter, *, pinned: bool = False, check_finite: bool = True) -> HostAdapter:
    """Read the weights of ``checked`` into CPU memory (one buffer, page-locked when ``pinned``), refusing
    files changed since validation and, with ``check_finite``, NaN/infinite weights (a generator that
    checks them where they land, on the GPU, passes False).

    A changed file is recognised by its size, modification time and inode, not by re-hashing it: the
    content hash made at validation names the version, and hashing again would cost a cold load more
    than reading the file.

    Raises:
        Conflict: the weights on disk are no longer those validated.  InvalidAdapter: non-finite weights.
    """
    weights_path = checked.path / WEIGHTS_FILE
    try:
        changed = _stat_identity(weights_path) != checked.weights_stat
    except OSError as error:
        raise Conflict(f"adapter {checked.tenant}/{checked.name} is gone from disk: {error}") from error
    if changed:
        raise Conflict(f"adapter {checked.tenant}/{checked.name}: {WEIGHTS_FILE} changed since it was validated")
    try:
        flat = read_flat(weights_path, pinned=pinned)
    except InvalidSafetensors as error:
        raise InvalidAdapter(f"adapter {checked.name!r}: {error}") from error
    bad = flat.first_non_finite() if check_finite else None
    if bad is not None:
        raise InvalidAdapter(f"adapter {checked.name!r}: {WEIGHTS_FILE} tensor {bad!r} has NaN or infinite values")
    return HostAdapter(key=checked.key, path=checked.path, peft_config=checked.peft_config, tensors=flat.views(),
                       nbytes=flat.nbytes, flat=flat)


def _stat_identity(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


def _check_rank(name: str, config: dict, manifest: AdapterManifest | None, max_rank: int) -> int:
    ranks = {"r": config.get("r", 8)} | {f"rank_pattern.{k}": v for k, v in (config.get("rank_pattern") or {}).items()}
    if manifest is not None:
        ranks[f"{MANIFEST_FILE} lora.rank"] = manifest.rank
    for field, rank in ranks.items():
        if not isinstance(rank, int) or rank < 1:
            raise InvalidAdapter(f"adapter {name!r}: {CONFIG_FILE} field {field!r} is {rank!r}, not a positive integer")
        if rank > max_rank:
            raise InvalidAdapter(f"adapter {name!r}: field {field!r} is rank {rank}, over adapters.max_rank={max_rank}")
    return max(ranks.values())


def _check_base(name: str, config: dict, manifest: AdapterManifest | None, served: ServedModel) -> None:
    if manifest is not None:
        if manifest.base_fingerprint != served.fingerprint:
            raise Conflict(
                f"adapter {name!r} was trained on {manifest.base_model!r} (fingerprint {manifest.base_fingerprint}) "
                f"but this server runs {served.name!r} (fingerprint {served.fingerprint})",
                hint=f"serve it with {manifest.base_model!r} or retrain it on {served.name!r}",
            )
        return
    base = config.get("base_model_name_or_path")
    if _names_served_base(base, served):
        return
    local = _local_fingerprint(base)
    if local is not None and local == served.fingerprint:
        return  # a local copy of the same architecture under another path
    names = [public_model_name(name) for name in (served.name, *served.aliases)]
    # One message whether or not ``base`` is a model folder on this machine: the refusal must not tell a tenant
    # what lies at a server path it named (nor that model's fingerprint).
    raise Conflict(
        f"adapter {name!r} has no {MANIFEST_FILE} and its {CONFIG_FILE} field 'base_model_name_or_path' is "
        f"{base!r}, not the served model: it is none of the served model's names {names}, nor a copy of the "
        "served model's architecture on this server",
        hint=f"if this server runs the weights of {base!r}, set server.served_model_name to {base!r} or add it to "
        "adapters.base_model_aliases; otherwise train the adapter on the served model",
    )


def _names_served_base(base, served: ServedModel) -> bool:
    """``base`` is the served model's path or id, its served name, or an alias the admin declared."""
    if not isinstance(base, str) or not base:
        return False
    if base in (served.name, *served.aliases):
        return True
    resolved = Path(base).expanduser().resolve()
    return any(resolved == Path(known).expanduser().resolve() for known in (served.name, *served.aliases))


def public_model_name(name: str) -> str:
    """A served name fit for a tenant's eyes: a server path is shown by its last part only."""
    path = Path(name)
    return f".../{path.name}" if path.is_absolute() else name


def _local_fingerprint(base) -> str | None:
    """The architecture fingerprint of ``base`` when it is a model dir on this machine, else None."""
    if not isinstance(base, str) or not base:
        return None
    config_path = Path(base).expanduser() / "config.json"
    try:
        return model_fingerprint(json.loads(config_path.read_text(encoding="utf-8")))
    except (OSError, ValueError, AttributeError):
        return None


def _check_method(name: str, config: dict, manifest: AdapterManifest | None, served: ServedModel) -> None:
    dora = bool(config.get("use_dora")) or (manifest is not None and manifest.method == "dora")
    if dora and not served.dora:
        raise Conflict(
            f"adapter {name!r} is a DoRA adapter ({CONFIG_FILE} field 'use_dora'), which the multi-adapter engine "
            f"serving {served.name!r} does not run (it serves plain LoRA)",
            hint='retrain it without DoRA, or serve with generation.engine = "transformers"',
        )


def _check_targets(name: str, config: dict, served: ServedModel) -> None:
    targets = config.get("target_modules")
    if targets is None or targets == "all-linear":
        return
    if isinstance(targets, str):  # peft treats a string as a regex over full module names
        if not _pattern_matches_a_module(name, targets, served.linear):
            raise InvalidAdapter(f"adapter {name!r}: {CONFIG_FILE} field 'target_modules' {targets!r} matches no module")
        return
    suffixes = {module.rsplit(".", 1)[-1] for module in served.linear}
    missing = [t for t in targets if t not in suffixes and t not in served.linear]
    if missing:
        raise InvalidAdapter(
            f"adapter {name!r}: {CONFIG_FILE} field 'target_modules' names {missing}, which the served model "
            f"{served.name!r} does not have (it has {sorted(suffixes)})"
        )


# Seconds a target_modules pattern may take over all the served model's module names. A pattern with nested
# repetition ("(.*)*x") backtracks exponentially in a name's length, and peft matches it with the standard
# library's re, whose matching cannot be interrupted in-process: so it runs in a child process with a time limit.
PATTERN_SECONDS = 2.0
_MATCH_IN_CHILD = (
    "import json, re, sys\n"
    "pattern, names = json.load(sys.stdin)\n"
    "print(json.dumps(any(re.fullmatch(pattern, n) for n in names)))\n"
)


PATTERN_MAX_CHARS = 4096  # compiled in-process, where nothing limits its time


class CheckUnavailable(LoragError):
    """Validation could not run (the checking process failed): not the adapter's fault, so try again."""

    http_status = 503


def _pattern_matches_a_module(name: str, pattern: str, modules) -> bool:
    """Whether ``pattern`` fully matches one of ``modules`` with re.fullmatch, as peft matches it.

    Raises:
        InvalidAdapter: the pattern is too long, not a regular expression, or takes too long to match.
        CheckUnavailable: the child process that matches it could not run.
    """
    field = f"adapter {name!r}: {CONFIG_FILE} field 'target_modules' {pattern[:80]!r}"
    if len(pattern) > PATTERN_MAX_CHARS:
        raise InvalidAdapter(f"{field} is {len(pattern)} characters long, over {PATTERN_MAX_CHARS}")
    try:
        re.compile(pattern)
    # Not only re.error: "a{4294967296}" overflows, a thousand nested groups recurse too deep.
    except (re.error, OverflowError, RecursionError) as error:
        raise InvalidAdapter(f"{field} is not a valid regular expression: {error}") from None
    try:
        # -I -S: no site packages, environment or user paths: the child needs the standard library only.
        done = subprocess.run([sys.executable, "-I", "-S", "-c", _MATCH_IN_CHILD], capture_output=True, text=True,
                              input=json.dumps([pattern, list(modules)]), timeout=PATTERN_SECONDS, check=True)
        return bool(json.loads(done.stdout))
    except subprocess.TimeoutExpired:
        raise InvalidAdapter(f"{field} takes over {PATTERN_SECONDS:g} s to match the model's module names "
                             f"(nested repetition?)", hint="name the modules as a list, or simplify the pattern") from None
    except subprocess.CalledProcessError as error:
        raise CheckUnavailable(f"{field}: the process matching it failed ({(error.stderr or '').strip()[-200:]})",
                               hint="try again") from None
    except (OSError, ValueError) as error:
        raise CheckUnavailable(f"{field}: the process matching it could not run ({error})", hint="try again") from None


def _check_tensors(name: str, weights_path: Path, served: ServedModel | None, max_rank: int) -> None:
    """Shapes from the safetensors header only: A (r, in), B (out, r) for modules the served model has."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            shapes = {key: (tuple(handle.get_slice(key).get_shape()), handle.get_slice(key).get_dtype())
                      for key in handle.keys()}
    except Exception as error:  # noqa: BLE001 - any header error means the same: not a safetensors file
        raise InvalidAdapter(f"adapter {name!r}: {WEIGHTS_FILE} is not a readable safetensors file: {error}") from error
    check_tensor_shapes(name, shapes, served, max_rank)


def check_weights_header(name: str, header: dict, served: ServedModel | None, max_rank: int) -> None:
    """The tensor checks of :func:`check_adapter_dir` from a raw safetensors header (an upload not yet written).

    Raises:
        InvalidAdapter: a tensor that is not a LoRA weight of the served model, or a malformed entry.
    """
    shapes = {}
    for key, spec in header.items():
        if key == "__metadata__":
            continue
        shape = spec.get("shape") if isinstance(spec, dict) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise InvalidAdapter(f"adapter {name!r}: {WEIGHTS_FILE} tensor {key!r} has a malformed shape")
        shapes[key] = (tuple(shape), spec.get("dtype"))
    check_tensor_shapes(name, shapes, served, max_rank)


def check_tensor_shapes(name: str, shapes: dict[str, tuple[tuple, str]], served: ServedModel | None,
                        max_rank: int) -> None:
    """Raises: InvalidAdapter unless every tensor is a float LoRA A (r, in) or B (out, r) of a served module."""
    if not shapes:
        raise InvalidAdapter(f"adapter {name!r}: {WEIGHTS_FILE} holds no tensors")
    pairs: dict[str, dict[str, tuple]] = {}
    for key, (shape, dtype) in shapes.items():
        match = _TENSOR.match(key)
        if match is None:
            raise InvalidAdapter(f"adapter {name!r}: {WEIGHTS_FILE} tensor {key!r} is not a LoRA A/B weight")
        if dtype not in FLOAT_DTYPES:
            raise InvalidAdapter(f"adapter {name!r}: {WEIGHTS_FILE} tensor {key!r} has dtype {dtype}, not a float")
        module = match.group("module")
        if served is not None and module not in served.linear:
            raise InvalidAdapter(
                f"adapter {name!r}: {WEIGHTS_FILE} tensor {key!r} adapts module {module!r}, which the served "
                f"model {served.name!r} does not have"
            )
        pairs.setdefault(module, {})[match.group("part")] = shape
    for module, parts in pairs.items():
        if "lora_A" not in parts or "lora_B" not in parts:
            raise InvalidAdapter(f"adapter {name!r}: {WEIGHTS_FILE} module {module!r} lacks lora_A or lora_B")
        a, b = parts["lora_A"], parts["lora_B"]
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise InvalidAdapter(f"adapter {name!r}: {WEIGHTS_FILE} module {module!r} has A {a} and B {b}: "
                                 "expected A (r, in) and B (out, r)")
        if a[0] > max_rank:
            raise InvalidAdapter(f"adapter {name!r}: {WEIGHTS_FILE} module {module!r} has rank {a[0]}, "
                                 f"over adapters.max_rank={max_rank}")
        if served is not None:
            in_features, out_features = served.linear[module]
            if a[1] != in_features or b[0] != out_features:
                raise InvalidAdapter(
                    f"adapter {name!r}: {WEIGHTS_FILE} module {module!r} has A {a} and B {b}, expected "
                    f"({a[0]}, {in_features}) and ({out_features}, {a[0]}) for the served model {served.name!r}"
                )


def _file_digest(path: Path) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.digest()
