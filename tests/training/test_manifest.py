"""The adapter manifest: fingerprints, validation errors that name file and field, atomic directory writes."""

import json

import pytest

from core.errors import Conflict, LoragError, NotFound
from core.prompt import PROMPT_FORMAT
from adapters.manifest import (
    AdapterManifest,
    LoraSpec,
    check_base,
    model_fingerprint,
    prompt_format_warning,
    read_manifest,
    write_adapter_dir,
    write_manifest,
)


def manifest(**changes) -> AdapterManifest:
    values = dict(name="a", tenant="acme", base_model="tiny", base_fingerprint=model_fingerprint(CONFIG),
                  method="lora", lora=LoraSpec(rank=8, alpha=16))
    values.update(changes)
    return AdapterManifest(**values)


CONFIG = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 512}


def test_fingerprint_ignores_dtype_and_name_but_not_shape():
    from transformers import LlamaConfig

    config = LlamaConfig(**{k: v for k, v in CONFIG.items() if k != "model_type"})
    assert model_fingerprint(config) == model_fingerprint(CONFIG)
    assert model_fingerprint({**CONFIG, "torch_dtype": "bfloat16", "_name_or_path": "x"}) == model_fingerprint(CONFIG)
    assert model_fingerprint({**CONFIG, "hidden_size": 128}) != model_fingerprint(CONFIG)
    assert model_fingerprint({**CONFIG, "model_type": "qwen2"}) != model_fingerprint(CONFIG)


def test_check_base_refuses_another_architecture():
    check_base(manifest(), CONFIG)
    with pytest.raises(Conflict, match="trained on 'tiny'"):
        check_base(manifest(), {**CONFIG, "num_hidden_layers": 3})


def test_read_manifest_round_trips_and_names_file_and_field(tmp_path):
    write_manifest(tmp_path, manifest())
    assert read_manifest(tmp_path) == manifest(created_at=read_manifest(tmp_path).created_at)
    path = tmp_path / "lorag_adapter.json"
    raw = json.loads(path.read_text())

    raw["lora"]["rank"] = 0
    path.write_text(json.dumps(raw))
    with pytest.raises(LoragError, match=r"lorag_adapter\.json.*field 'lora\.rank'"):
        read_manifest(tmp_path)

    del raw["base_fingerprint"]
    raw["lora"]["rank"] = 8
    path.write_text(json.dumps(raw))
    with pytest.raises(LoragError, match=r"field 'base_fingerprint'"):
        read_manifest(tmp_path)

    raw["format_version"] = 99
    path.write_text(json.dumps(raw))
    with pytest.raises(LoragError, match=r"field 'format_version' is 99"):
        read_manifest(tmp_path)

    path.write_text("{not json")
    with pytest.raises(LoragError, match="not readable JSON"):
        read_manifest(tmp_path)
    with pytest.raises(NotFound):
        read_manifest(tmp_path / "missing")


def fill_complete(directory):
    (directory / "adapter_model.safetensors").write_bytes(b"x")
    (directory / "adapter_config.json").write_text("{}")
    write_manifest(directory, manifest())


def test_write_adapter_dir_is_all_or_nothing(tmp_path):
    target = tmp_path / "adapters" / "a"

    def crash(directory):
        (directory / "adapter_model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_adapter_dir(target, crash)
    assert not target.exists() and list(target.parent.iterdir()) == []

    with pytest.raises(LoragError, match="incomplete: adapter_config.json"):
        write_adapter_dir(target, lambda d: (d / "adapter_model.safetensors").write_bytes(b"x"))
    assert not target.exists()

    write_adapter_dir(target, fill_complete)
    assert read_manifest(target).name == "a"
    with pytest.raises(Conflict, match="already exists"):
        write_adapter_dir(target, fill_complete)
    write_adapter_dir(target, fill_complete, overwrite=True)
    assert sorted(p.name for p in target.parent.iterdir()) == ["a"]


def test_failed_replace_keeps_the_old_adapter_registered(tmp_path, monkeypatch):
    import os

    target = tmp_path / "adapters" / "a"
    write_adapter_dir(target, fill_complete)
    real_rename = os.rename

    def rename_fails_for_the_new_dir(src, dst):
        if str(src).startswith(str(target.parent / ".tmp-")):
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename_fails_for_the_new_dir)
    with pytest.raises(OSError):
        write_adapter_dir(target, fill_complete, overwrite=True)
    monkeypatch.undo()
    assert read_manifest(target).name == "a"  # still registered, not stranded under .old-*
    assert sorted(p.name for p in target.parent.iterdir()) == ["a"]


def test_a_prompt_format_other_than_todays_is_flagged_never_silent():
    assert prompt_format_warning(manifest(prompt_format=PROMPT_FORMAT)) is None
    assert prompt_format_warning(None) is None  # a plain peft dir: no lorag prompt to compare with
    plain = manifest(prompt_format=None, hyperparameters={"registered_from": "plain peft directory"})
    assert prompt_format_warning(plain) is None
    older = prompt_format_warning(manifest(prompt_format=PROMPT_FORMAT + 1))
    assert f"prompt format {PROMPT_FORMAT + 1}" in older and f"builds prompt format {PROMPT_FORMAT}" in older
    assert "acme/a" in older and "lorag train" in older
    # a manifest written before the field existed was trained on format 1
    unrecorded = prompt_format_warning(manifest(prompt_format=None))
    assert (unrecorded is None) == (PROMPT_FORMAT == 1)
