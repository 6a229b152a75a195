"""FSDP2 training on CPU: two gloo processes under `accelerate launch` with the project's FSDP config.

Each run is compared with one process training on the whole batch in the same data order: the same loss
sequence and the same adapter, within float tolerance (only the order of additions differs).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapters.manifest import read_manifest
from core.errors import LoragError
from tests.conftest import REPO_ROOT
from tests.training.conftest import MEMORISE, train_settings, write_openai_jsonl
from tests.training.fsdp_resume_run import INTERRUPT_AT, SETTINGS, settings as resume_settings

FSDP_CONFIG = REPO_ROOT / "configs" / "accelerate" / "fsdp.yaml"
SHARDED_LOG = "FSDP2: 2 decoder layers and the root sharded across 2 processes (weights sent from the main process)"


def _accelerate_launch(*args: str, runs: int = 1, timeout: int = 240) -> subprocess.CompletedProcess:
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run(
        [str(accelerate), "launch", "--config_file", str(FSDP_CONFIG), "--num_processes", "2", *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    # Both processes sharded the model, the main one sent the weights, once per training run.
    assert (completed.stdout + completed.stderr).count(SHARDED_LOG) == 2 * runs
    return completed


def _adapter_tensors(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def _assert_same_tensors(got: dict, want: dict) -> None:
    import torch

    assert got.keys() == want.keys()
    for key in want:
        assert got[key].shape == want[key].shape, key
        # Adam divides by sqrt(v): where a gradient is near zero, summation-order rounding moves an update by a
        # visible fraction; 5e-4 is 5% of one step at lr 1e-2, while a lost optimizer state moves weights by steps.
        torch.testing.assert_close(got[key], want[key], atol=5e-4, rtol=1e-3, msg=lambda detail: f"{key}: {detail}")


def _logged_losses(adapter_dir: Path) -> list[float]:
    lines = (adapter_dir / "train_log.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if "loss" in record]


@pytest.mark.slow
def test_fsdp_two_processes_train_the_adapter_one_process_trains(tmp_path, tiny_llama_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adapters.host import ServedModel
    from adapters.validation import check_adapter_dir, read_host_adapter
    from training.recipe import train_adapter

    data = write_openai_jsonl(tmp_path / "train.jsonl", MEMORISE * 2)
    common = dict(max_steps=3, dropout=0.0, val_split=0.0)
    reference = train_adapter(train_settings(tmp_path / "one", tiny_llama_path, batch_size=2, **common),
                              tenant="acme", data_file=data, name="one")

    completed = _accelerate_launch(
        "-m", "lorag", "train", "--tenant", "acme", "--data", str(data), "--base", str(tiny_llama_path),
        "--data-dir", str(tmp_path / "two"), "--name", "fsdp", "--max-steps", "3", "--batch-size", "1",
        "--dropout", "0", "--val-split", "0", "--lr", "1e-2", "--max-seq-len", "256", "--warmup-ratio", "0",
    )
    assert completed.stdout.count("adapter acme/fsdp saved") == 1  # only the main process writes and reports
    adapter_dir = tmp_path / "two" / "tenants" / "acme" / "adapters" / "fsdp"
    assert sorted(p.name for p in adapter_dir.parent.iterdir()) == ["fsdp"]

    losses = _logged_losses(adapter_dir)
    assert len(losses) == 3
    assert losses == pytest.approx(reference.losses, rel=1e-5)
    assert losses[-1] < losses[0]  # it did learn
    sharded, single = _adapter_tensors(adapter_dir), _adapter_tensors(reference.adapter_dir)
    _assert_same_tensors(sharded, single)  # gathered full tensors, not one process's shards
    assert read_manifest(adapter_dir).metrics.steps == 3

    # Plain peft loads the directory, and it answers as the single-process adapter does.
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32)
    served = ServedModel.of_module(base, name=str(tiny_llama_path))
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        got = PeftModel.from_pretrained(base, adapter_dir)(input_ids=ids).logits
        want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32),
                                         reference.adapter_dir)(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # And the server's loader accepts it for the served base.
    checked = check_adapter_dir(adapter_dir, tenant="acme", name="fsdp", served=served, max_rank=64, max_bytes=10**8)
    assert read_host_adapter(checked).tensors.keys() == sharded.keys()


@pytest.fixture(scope="module")
def tied_qwen2_path(tmp_path_factory) -> Path:
    """A tiny Qwen2 whose lm_head is its input embedding (as Qwen2.5-0.5B and SmolLM2 are): one shared
    parameter that FSDP must keep in one unit and the main process must send once."""
    from transformers import AutoModelForCausalLM

    from tests.model_factory import build_model

    path = build_model(tmp_path_factory.mktemp("tied-qwen2"), architecture="qwen2")
    model = AutoModelForCausalLM.from_pretrained(path)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(path)
    return path


@pytest.mark.slow
def test_fsdp_checkpoint_and_resume_give_the_uninterrupted_adapter(tmp_path, tied_qwen2_path):
    import torch
    from safetensors.torch import load_file

    from training.recipe import train_adapter

    data = write_openai_jsonl(tmp_path / "train.jsonl", MEMORISE * 2)
    reference = train_adapter(resume_settings(tmp_path / "one", tied_qwen2_path, batch_size=2),
                              tenant="acme", data_file=data, name="one")
    assert reference.step == SETTINGS["max_steps"]

    out = tmp_path / "out"
    _accelerate_launch(str(REPO_ROOT / "tests" / "training" / "fsdp_resume_run.py"),
                       str(tmp_path / "two"), str(tied_qwen2_path), str(data), "resumed", str(out), runs=2)

    # The checkpoint holds full tensors (gathered from both shards), optimizer state included.
    checkpoint = out / "checkpoint"
    assert json.loads((checkpoint / "state.json").read_text())["step"] == INTERRUPT_AT
    adapter = load_file(str(checkpoint / "adapter_weights.safetensors"))
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    lora_a = next(key for key in adapter if key.endswith("q_proj.lora_A.weight"))
    state_shapes = {tuple(value["exp_avg"].shape) for value in optimizer["state"].values()}
    assert tuple(adapter[lora_a].shape) == (16, 64) and (16, 64) in state_shapes
    assert len(optimizer["state"]) == len(adapter)

    adapter_dir = tmp_path / "two" / "tenants" / "acme" / "adapters" / "resumed"
    _assert_same_tensors(_adapter_tensors(adapter_dir), _adapter_tensors(reference.adapter_dir))
    assert _logged_losses(adapter_dir) == pytest.approx(reference.losses, rel=1e-5)
    manifest, want = read_manifest(adapter_dir), reference.manifest
    assert manifest.metrics.best_step == want.metrics.best_step
    assert manifest.metrics.val_loss == pytest.approx(want.metrics.val_loss, rel=1e-5)


def test_fsdp1_configs_are_refused_by_name(monkeypatch):
    from training.sharding import fsdp_requested

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(LoragError, match="FSDP version 1; lorag trains with FSDP2") as raised:
        fsdp_requested()
    assert "fsdp_version: 2" in str(raised.value)
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert fsdp_requested()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert not fsdp_requested()


def test_fsdp_qlora_without_cuda_is_refused_before_loading(monkeypatch, tmp_path, tiny_llama_path, memorise_file):
    import torch

    from training.recipe import train_adapter

    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without CUDA")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    settings = train_settings(tmp_path / "data", tiny_llama_path, method="qlora", max_steps=1)
    with pytest.raises(LoragError, match="--method qlora needs a CUDA GPU"):
        train_adapter(settings, tenant="acme", data_file=memorise_file, name="q")


def test_fsdp_configs_launch_lorag_with_fsdp2():
    """The shipped accelerate configs say what the README says they do."""
    import yaml

    configs = {path.stem: yaml.safe_load(path.read_text()) for path in FSDP_CONFIG.parent.glob("*.yaml")}
    assert set(configs) == {"single_gpu", "ddp", "fsdp", "fsdp_qlora"}
    assert configs["single_gpu"]["num_processes"] == 1 and configs["ddp"]["distributed_type"] == "MULTI_GPU"
    for name in ("fsdp", "fsdp_qlora"):
        assert configs[name]["distributed_type"] == "FSDP" and configs[name]["fsdp_config"]["fsdp_version"] == 2
    assert configs["fsdp"]["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] is True
    assert "--method qlora" in FSDP_CONFIG.with_name("fsdp_qlora.yaml").read_text()


@pytest.fixture
def one_process_group():
    """A gloo process group of this process alone: FSDP with a world size of 1, in-process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_run_resumes_only_as_it_was_sharded(monkeypatch, tmp_path, tiny_llama_path, memorise_file, one_process_group):
    import signal

    from training.recipe import train_adapter

    def interrupt(step, record):
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    settings = train_settings(tmp_path / "data", tiny_llama_path, max_steps=3, dropout=0.0, batch_size=1)
    first = train_adapter(settings, tenant="acme", data_file=memorise_file, name="r", on_step=interrupt)
    assert first.interrupted and first.step == 1
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    with pytest.raises(LoragError, match="run acme/r was started with different sharding"):
        train_adapter(settings, tenant="acme", data_file=memorise_file, name="r", resume=True)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    second = train_adapter(settings, tenant="acme", data_file=memorise_file, name="r", resume=True)
    assert not second.interrupted and second.step == 3
