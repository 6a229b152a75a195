"""Adapter dirs as the HF Trainer and LLaMA-Factory save them, and adapters trained on the hub id of the served
weights: accepted when lorag can tell they fit, refused with what differs when not. Pickles are never opened."""

import json
import pickle
import shutil
from pathlib import Path

import pytest

from core.errors import Conflict
from adapters.host import ServedModel
from adapters.registry import InvalidAdapter
from adapters.validation import check_adapter_dir
from tests.adapters.conftest import make_adapter

HUB_ID = "example-org/tiny-llama-instruct"


class _Tripwire:
    """Unpickling this creates ``path``: the file's absence proves nobody unpickled it."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def trainer_dir(source: Path, target: Path, tripwire: Path, tokenizer_from: Path) -> Path:
    """``source`` (a peft dir) with what transformers' Trainer and LLaMA-Factory write next to it."""
    shutil.copytree(source, target)
    (target / "lorag_adapter.json").unlink(missing_ok=True)
    (target / "training_args.bin").write_bytes(pickle.dumps(_Tripwire(tripwire)))
    (target / "trainer_state.json").write_text(json.dumps({"global_step": 3, "log_history": []}))
    (target / "README.md").write_text("---\nlibrary_name: peft\n---\n# model card\n")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_from / name).is_file():
            shutil.copyfile(tokenizer_from / name, target / name)
    return target


@pytest.fixture(scope="module")
def served(tiny_llama_path):
    from transformers import AutoModelForCausalLM

    return ServedModel.of_module(AutoModelForCausalLM.from_pretrained(tiny_llama_path), name=str(tiny_llama_path))


def check(path, served, name="trained"):
    return check_adapter_dir(path, tenant="acme", name=name, served=served, max_rank=64, max_bytes=10**8)


def test_a_trainer_output_dir_is_accepted_without_unpickling(tiny_llama_path, served, tmp_path):
    plain = make_adapter(tiny_llama_path, tmp_path / "plain", seed=11, manifest=False)
    tripwire = tmp_path / "unpickled"
    path = trainer_dir(plain, tmp_path / "trainer-out", tripwire, tiny_llama_path)
    checked = check(path, served)
    assert checked.rank == 4 and checked.manifest is None
    assert not tripwire.exists()


def test_weights_only_as_pickles_are_still_refused(tiny_llama_path, served, tmp_path):
    plain = make_adapter(tiny_llama_path, tmp_path / "plain", seed=11, manifest=False)
    path = trainer_dir(plain, tmp_path / "trainer-out", tmp_path / "unpickled", tiny_llama_path)
    (path / "adapter_model.safetensors").unlink()
    (path / "adapter_model.bin").write_bytes(pickle.dumps({"weights": 1}))
    with pytest.raises(InvalidAdapter, match="only in 'adapter_model.bin', a pickle"):
        check(path, served)


def _on_hub_id(tiny_llama_path, tmp_path) -> Path:
    plain = make_adapter(tiny_llama_path, tmp_path / "plain", seed=12, manifest=False)
    config = json.loads((plain / "adapter_config.json").read_text())
    (plain / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": HUB_ID}))
    return plain


def test_an_adapter_on_the_hub_id_fits_the_same_weights_served_under_that_name(tiny_llama_path, served, tmp_path):
    import dataclasses

    plain = _on_hub_id(tiny_llama_path, tmp_path)
    with pytest.raises(Conflict) as refused:
        check(plain, served)
    message = str(refused.value)
    assert HUB_ID in message and f".../{tiny_llama_path.name}" in message  # what differs: the two names
    assert str(tiny_llama_path) not in message  # a tenant never sees a server path
    assert "server.served_model_name" in message and "adapters.base_model_aliases" in message
    # served_model_name (or an alias the admin declares) names these weights: accepted, shapes still checked
    assert check(plain, dataclasses.replace(served, aliases=(HUB_ID,))).rank == 4


def test_a_local_copy_of_the_base_is_recognised_by_its_architecture(tiny_llama_path, served, tmp_path):
    copy = shutil.copytree(tiny_llama_path, tmp_path / "elsewhere" / "tiny-llama")
    plain = make_adapter(tiny_llama_path, tmp_path / "plain", seed=13, manifest=False)
    config = json.loads((plain / "adapter_config.json").read_text())
    (plain / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": str(copy)}))
    assert check(plain, served).rank == 4
    other = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(other | {"num_hidden_layers": 3}))
    with pytest.raises(Conflict, match="nor a copy of the served model's architecture") as other_architecture:
        check(plain, served)
    # the refusal reads the same as for a path where nothing is: it tells nothing of what lies at a server path
    (plain / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": str(copy) + "-gone"}))
    with pytest.raises(Conflict) as nothing_there:
        check(plain, served)
    assert str(other_architecture.value).replace(str(copy), "P") == \
        str(nothing_there.value).replace(str(copy) + "-gone", "P")
    assert "sha256:" not in str(other_architecture.value)
