"""The one reader of a peft adapter directory: ``adapter_config.json`` and ``adapter_model.safetensors``.

Every reader (the server's validation, the engine's slots) comes through here, so the file rules are
checked once: safetensors only (lorag never unpickles), no symbolic links, a JSON-object config of a LoRA.
"""

import json
import math
from pathlib import Path

from adapters.registry import InvalidAdapter
from adapters.safetensors_flat import FlatTensors, InvalidSafetensors, read_flat

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 32
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")


def check_files(path: Path, *, name: str | None = None) -> None:
    """Refuse a dir that is missing, lacks the two peft files (weights only as a pickle counts as lacking
    them), or holds links. Other files are left alone and never opened: the HF Trainer and LLaMA-Factory
    save ``training_args.bin`` (a pickle), ``trainer_state.json``, a README and tokenizer files next to the
    adapter, and none of them is read.

    Raises:
        InvalidAdapter: naming the file and the reason.
    """
    path = Path(path)
    where = _where(path, name)
    if not path.is_dir():
        raise InvalidAdapter(f"adapter directory {str(path)!r} does not exist")
    if not (path / WEIGHTS_FILE).is_file():
        pickled = sorted(item.name for item in path.glob("adapter_model*") if is_pickle(item))
        if pickled:
            raise InvalidAdapter(
                f"{where}: the weights are only in {pickled[0]!r}, a pickle-based checkpoint, which lorag never "
                f"loads; save the adapter as {WEIGHTS_FILE} (peft save_pretrained with safe_serialization=True)"
            )
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / required).is_file():
            raise InvalidAdapter(
                f"{where}: {required} is missing (no {required} in the adapter dir; save it with peft save_pretrained)"
            )
    for item in path.rglob("*"):
        if item.is_symlink():
            raise InvalidAdapter(f"adapter file {str(item.relative_to(path))!r} is a symbolic link; copy the file instead")


def is_pickle(path: Path) -> bool:
    """A file lorag must never open: a pickle-based checkpoint (``training_args.bin``, ``adapter_model.bin``)."""
    return path.suffix.lower() in PICKLE_SUFFIXES


def read_config(path: Path, *, name: str | None = None) -> tuple[dict, bytes]:
    """``adapter_config.json`` as a dict, with its raw bytes (which name the adapter's version).

    Raises:
        InvalidAdapter: unreadable, not UTF-8 JSON, not an object, or not a LoRA config.
    """
    config_path = Path(path) / CONFIG_FILE
    where = _where(Path(path), name)
    try:
        raw = config_path.read_bytes()
    except OSError as error:
        raise InvalidAdapter(f"{where}: cannot read {CONFIG_FILE}: {error}") from error
    if len(raw) > MAX_CONFIG_BYTES:
        raise InvalidAdapter(f"{where}: {CONFIG_FILE} is {len(raw)} bytes; a LoRA config is a few hundred")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidAdapter(f"{where}: {CONFIG_FILE} is not UTF-8 text (byte {error.start})") from error
    if (depth := _nesting_depth(text)) > MAX_CONFIG_DEPTH:
        # Checked before parsing, to say the depth and the limit: json's decoder recurses per level, and past
        # the interpreter's limit it only raises RecursionError (caught below, as the other JSON readers do).
        raise InvalidAdapter(f"{where}: {CONFIG_FILE} is nested {depth} levels deep; at most {MAX_CONFIG_DEPTH}")
    try:
        config = json.loads(text, object_pairs_hook=_refuse_duplicate_keys, parse_constant=_refuse_constant)
    except _DuplicateKey as error:
        raise InvalidAdapter(f"{where}: {CONFIG_FILE} has the key {error.key!r} twice") from error
    except (ValueError, RecursionError) as error:  # invalid JSON, or a number too long to convert
        raise InvalidAdapter(f"{where}: {CONFIG_FILE} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{where}: {CONFIG_FILE} must hold a JSON object, not {type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise InvalidAdapter(f"{where}: {CONFIG_FILE} field 'peft_type' is {config.get('peft_type')!r}, not LORA")
    _check_field_types(config, where)
    return config, raw


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _refuse_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    # json keeps the last of two equal keys silently; two readers could then disagree on the adapter.
    config = {}
    for key, value in pairs:
        if key in config:
            raise _DuplicateKey(key)
        config[key] = value
    return config


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _nesting_depth(text: str) -> int:
    """The deepest nesting of [ and { outside strings (a linear scan, no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


# The fields lorag and peft read, with the JSON types they must have (None is allowed where peft allows it).
_FIELD_RULES = {
    "r": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "lora_alpha": (_is_number, "a finite number"),
    "lora_dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "target_modules": (lambda v: v is None or isinstance(v, str) or _is_str_list(v), "a string or a list of strings"),
    "modules_to_save": (lambda v: v is None or _is_str_list(v), "null or a list of strings"),
    "layers_to_transform": (lambda v: v is None or isinstance(v, int) and not isinstance(v, bool)
                            or isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v),
                            "null, an integer or a list of integers"),
    "rank_pattern": (lambda v: v is None or isinstance(v, dict) and all(
        isinstance(r, int) and not isinstance(r, bool) for r in v.values()), "an object of integers"),
    "alpha_pattern": (lambda v: v is None or isinstance(v, dict) and all(_is_number(a) for a in v.values()),
                      "an object of finite numbers"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "inference_mode": (lambda v: isinstance(v, bool), "true or false"),
    "bias": (lambda v: v in ("none", "all", "lora_only"), "'none', 'all' or 'lora_only'"),
    "base_model_name_or_path": (lambda v: v is None or isinstance(v, str), "null or a string"),
    "task_type": (lambda v: v is None or isinstance(v, str), "null or a string"),
    "peft_type": (lambda v: isinstance(v, str), "a string"),
}


def _check_field_types(config: dict, where: str) -> None:
    """Raises: InvalidAdapter naming the first field whose value has the wrong type (peft would fail later,
    deep inside the model, or worse, accept it)."""
    for field, (valid, expected) in _FIELD_RULES.items():
        if field in config and not valid(config[field]):
            shown = repr(config[field])
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise InvalidAdapter(f"{where}: {CONFIG_FILE} field {field!r} is {shown}; expected {expected}")


def read_peft_files(path: str | Path, *, name: str | None = None, pinned: bool = False) -> tuple[dict, FlatTensors]:
    """The config as a dict and the weights as one buffer of tensors (page-locked when ``pinned``, see read_flat).

    Raises:
        InvalidAdapter: a file is missing, linked, pickled, unreadable or malformed.
    """
    path = Path(path)
    check_files(path, name=name)
    config, _ = read_config(path, name=name)
    try:
        return config, read_flat(path / WEIGHTS_FILE, pinned=pinned)
    except InvalidSafetensors as error:
        raise InvalidAdapter(f"{_where(path, name)}: {error}") from error


def _where(path: Path, name: str | None) -> str:
    return f"adapter {name!r}" if name else f"adapter dir {str(path)!r}"
