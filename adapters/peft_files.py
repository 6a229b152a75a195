"""The one reader of a peft adapter directory: ``adapter_config.json`` and ``adapter_model.safetensors``.

Every reader (the server's validation, the engine's slots) comes through here, so the file rules are
checked once: safetensors only (lorag never unpickles), no symbolic links, a JSON-object config of a LoRA.
"""

import json
from pathlib import Path

from adapters.registry import InvalidAdapter
from adapters.safetensors_flat import FlatTensors, InvalidSafetensors, read_flat

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
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
    try:
        config = json.loads(raw)
    except ValueError as error:  # invalid JSON or invalid UTF-8
        raise InvalidAdapter(f"{where}: {CONFIG_FILE} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{where}: {CONFIG_FILE} must hold a JSON object, not {type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise InvalidAdapter(f"{where}: {CONFIG_FILE} field 'peft_type' is {config.get('peft_type')!r}, not LORA")
    return config, raw


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
