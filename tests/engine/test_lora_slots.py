"""Adapter slots: loading peft dirs, slot reuse, refusals (DoRA, rank, missing files, in use, full)."""

import json
import shutil

import pytest
import torch

from core.errors import Conflict, LoragError, NotFound
from server.engine.lora_slots import AdapterSlots, UnsupportedAdapter
from tests.engine.conftest import build_adapter, make_sequence, prompt_of, run_until_done


@pytest.fixture
def slots(engine):
    shape = engine.model.shape
    return AdapterSlots(layers=shape.layers, dims=shape.lora_dims(), num_slots=2, max_rank=8, dtype=torch.float32,
                        device="cpu")


def test_load_unload_and_reuse_a_slot(slots, arch_setup):
    _, _, dirs = arch_setup
    assert slots.load("a", dirs["alpha"]) == 1
    assert slots.load("b", dirs["beta"]) == 2
    with pytest.raises(Conflict, match="all 2 adapter slots are taken"):
        slots.load("c", dirs["gamma"])
    slots.unload("a")
    assert slots.load("c", dirs["gamma"]) == 1
    assert slots.resident() == {"c": 1, "b": 2}
    with pytest.raises(NotFound, match="'a' is not loaded"):
        slots.acquire("a")


def test_adapter_in_use_cannot_be_unloaded(slots, arch_setup):
    _, _, dirs = arch_setup
    slots.load("a", dirs["alpha"])
    slot = slots.acquire("a")
    with pytest.raises(Conflict, match="in use"):
        slots.unload("a")
    with pytest.raises(Conflict, match="in use"):
        slots.load("a", dirs["beta"])
    slots.release(slot)
    slots.unload("a")
    assert slots.resident() == {}


def test_reloaded_slot_serves_the_new_adapter(engine, reference, arch_setup):
    _, _, dirs = arch_setup
    prompt = prompt_of(30, 14)
    engine.adapters.unload("gamma")
    try:
        assert engine.adapters.load("gamma-as-alpha", dirs["alpha"]) == 3  # gamma's freed slot
        seq, collector = make_sequence(engine, prompt, adapter="gamma-as-alpha")
        engine.scheduler.submit(seq)
        run_until_done(engine.scheduler, [collector])
        assert collector.tokens == reference(prompt, "alpha", 16)
    finally:
        engine.adapters.unload("gamma-as-alpha")
        engine.adapters.load("gamma", dirs["gamma"])
    seq, collector = make_sequence(engine, prompt, adapter="gamma")
    engine.scheduler.submit(seq)
    run_until_done(engine.scheduler, [collector])
    assert collector.tokens == reference(prompt, "gamma", 16)


def test_dora_is_refused(slots, arch_setup, tmp_path):
    _, model_path, _ = arch_setup
    path = build_adapter(model_path, tmp_path / "dora", seed=3, r=4, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(UnsupportedAdapter, match="DoRA"):
        slots.load("dora", path)
    assert slots.resident() == {}


def test_rank_above_max_rank_is_refused(slots, arch_setup, tmp_path):
    _, model_path, _ = arch_setup
    path = build_adapter(model_path, tmp_path / "wide", seed=4, r=16, target_modules=["v_proj"])
    with pytest.raises(LoragError, match="rank 16 exceeds adapters.max_rank=8"):
        slots.load("wide", path)


def test_unsupported_target_module_is_refused(slots, arch_setup, tmp_path):
    _, model_path, _ = arch_setup
    path = build_adapter(model_path, tmp_path / "head", seed=5, r=2, target_modules=["lm_head"])
    with pytest.raises(UnsupportedAdapter, match="lm_head"):
        slots.load("head", path)


def test_missing_files_and_pickled_weights_are_refused(slots, arch_setup, tmp_path):
    _, _, dirs = arch_setup
    copy = tmp_path / "copy"
    shutil.copytree(dirs["alpha"], copy)
    (copy / "adapter_model.safetensors").rename(copy / "adapter_model.bin")  # a pickle-format name is never read
    with pytest.raises(LoragError, match="only in 'adapter_model.bin', a pickle"):
        slots.load("copy", copy)
    with pytest.raises(LoragError, match="no adapter_config.json"):
        slots.load("empty", tmp_path)


@pytest.mark.parametrize(("config", "message"), [(b"\x80\x81{", "is not UTF-8 text"), (b"{", "is not valid JSON"),
                                                 (b"[1, 2]", "must hold a JSON object")])
def test_malformed_adapter_config_is_refused_by_name(slots, arch_setup, tmp_path, config, message):
    _, _, dirs = arch_setup
    copy = tmp_path / "copy"
    shutil.copytree(dirs["alpha"], copy)
    (copy / "adapter_config.json").write_bytes(config)
    with pytest.raises(LoragError, match=f"adapter_config.json {message}"):
        slots.load("copy", copy)
    assert slots.resident() == {}


def test_adapter_for_another_model_is_refused(slots, arch_setup, tmp_path):
    _, model_path, dirs = arch_setup
    from tests.model_factory import build_model

    other = build_model(tmp_path / "other", architecture="llama", hidden_size=32, intermediate_size=64)
    path = build_adapter(other, tmp_path / "other-adapter", seed=6, r=2, target_modules=["q_proj"])
    with pytest.raises(LoragError, match="another base model"):
        slots.load("other", path)


def test_non_finite_weights_are_refused(slots, arch_setup, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, dirs = arch_setup
    copy = tmp_path / "nan"
    shutil.copytree(dirs["alpha"], copy)
    tensors = load_file(str(copy / "adapter_model.safetensors"))
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("nan")
    save_file(tensors, str(copy / "adapter_model.safetensors"))
    with pytest.raises(LoragError, match="non-finite"):
        slots.load("nan", copy)


def test_bias_and_modules_to_save_are_refused(slots, arch_setup, tmp_path):
    _, _, dirs = arch_setup
    for field, value, message in (("bias", "all", "bias='all'"), ("modules_to_save", ["lm_head"], "modules_to_save")):
        copy = tmp_path / field
        shutil.copytree(dirs["alpha"], copy)
        config = json.loads((copy / "adapter_config.json").read_text())
        config[field] = value
        (copy / "adapter_config.json").write_text(json.dumps(config))
        with pytest.raises(UnsupportedAdapter, match=message):
            slots.load(field, copy)


def test_a_reload_that_fails_midway_leaves_the_name_unloaded(slots, arch_setup, monkeypatch):
    """A reload writes into the same slot; if the write breaks off, neither version is served under the name."""
    _, _, dirs = arch_setup
    slot = slots.load("alpha", dirs["alpha"])

    def breaks_off(target_slot, weights):
        raise RuntimeError("device copy failed")

    monkeypatch.setattr(slots, "_write_slot", breaks_off)
    with pytest.raises(RuntimeError, match="device copy failed"):
        slots.load("alpha", dirs["beta"])
    assert "alpha" not in slots.resident()
    monkeypatch.undo()
    assert slots.load("beta", dirs["beta"]) == slot  # the slot is free again and fully rewritten
