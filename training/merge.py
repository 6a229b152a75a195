"""``lorag adapters merge``: base model + one adapter written as a plain transformers model."""

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from adapters.manifest import check_base, read_manifest
from adapters.registry import AdapterRegistry
from core.errors import Conflict, LoragError
from models.locate import locate_model


# --dtype names -> torch dtype names; "auto" keeps whatever the base checkpoint stores.
DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class MergedModel:
    """What ``merge_adapter`` wrote, for the CLI to report."""

    path: Path
    dtype: str  # torch dtype name of the written weights, e.g. "float32"
    base: str
    parameters: int
    bytes: int


def merge_adapter(
    registry: AdapterRegistry, tenant: str, name: str, out: Path, *, dtype: str = "auto", base_model: str | None = None
) -> MergedModel:
    """Write base + adapter as one plain transformers model to ``out``, never 4-bit.

    ``dtype="auto"`` keeps the base checkpoint's dtype (a float32 base stays float32); ``bf16``, ``fp16``
    or ``fp32`` convert.

    Raises:
        NotFound: no such adapter.
        Conflict: ``out`` exists and is not empty, or the base model's architecture differs.
        LoragError: the base checkpoint is quantised, or cannot be loaded.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    adapter = registry.existing(tenant, name)
    manifest = read_manifest(adapter)
    # "packaged" and hub ids resolve as training and serving resolve them
    base = locate_model(base_model or manifest.base_model, models_dir=registry.data_dir / "models")
    out = Path(out)
    _check_merge_output(out)
    if dtype not in DTYPES:
        raise LoragError(f"merge dtype {dtype!r} is not supported", hint=f"Use one of {', '.join(DTYPES)}")
    try:
        config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as error:
        raise LoragError(f"cannot load base model {base!r} to merge into: {error}") from error
    quantization = getattr(config, "quantization_config", None)
    if quantization:
        raise LoragError(
            f"base model {base!r} is a quantised checkpoint ({dict(quantization).get('quant_method', 'quantised')}); "
            "merging an adapter into 4-bit weights would round it away",
            hint="Merge into the bf16/fp32 base model (--base PATH) and quantise the merged model afterwards",
        )
    check_base(manifest, config)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, DTYPES[dtype])
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(base)

    tmp = out.parent / f".tmp-{out.name}-{uuid.uuid4().hex[:8]}"
    try:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(tmp, out)
    except OSError as error:  # disk full, permissions changed while merging
        shutil.rmtree(tmp, ignore_errors=True)
        raise LoragError(f"cannot write merge output {str(out)!r}: {error.strerror or error}") from error
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    written = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    return MergedModel(out, str(merged.dtype).removeprefix("torch."), str(base), merged.num_parameters(), written)


def _check_merge_output(out: Path) -> None:
    """Refuse an unusable ``--out`` before minutes of loading and merging, not after.

    Raises:
        Conflict: ``out`` is a file, or a directory that is not empty.
        LoragError: its parent cannot be created or written.
    """
    if out.is_file():
        raise Conflict(f"merge output {str(out)!r} is a file", hint="Pass an empty or new --out directory")
    if out.is_dir() and any(out.iterdir()):
        raise Conflict(f"merge output {str(out)!r} exists and is not empty", hint="Pass an empty or new --out directory")
    probe = out.parent / f".probe-{out.name}-{uuid.uuid4().hex[:8]}"
    try:  # create what the merge will create, so permissions and odd file systems fail now
        out.parent.mkdir(parents=True, exist_ok=True)
        probe.mkdir()
        probe.rmdir()
    except OSError as error:
        raise LoragError(f"cannot write merge output {str(out)!r}: {error.strerror or error}") from error
