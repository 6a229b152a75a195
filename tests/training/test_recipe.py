"""The fine-tuning recipe on a tiny CPU model: learning, early stopping, resume, outputs, QLoRA refusal."""

import json
import signal

import pytest
import torch

from core.errors import Conflict, LoragError
from core.prompt import PROMPT_FORMAT
from adapters.manifest import model_fingerprint, read_manifest
from tests.training.conftest import MEMORISE, train_settings, write_openai_jsonl
from training.recipe import train_adapter


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_loss_decreases_on_a_memorisable_set(method, memorise_file, data_dir, tiny_llama_path):
    # lm_head too: a random-init model's output layer is too weak for the other layers alone to fit answers.
    settings = train_settings(data_dir, tiny_llama_path, method=method, max_steps=12, rslora=method == "dora",
                              target_modules="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head")
    result = train_adapter(settings, tenant="acme", data_file=memorise_file, name=method)
    losses = result.losses
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    manifest = read_manifest(result.adapter_dir)
    assert manifest.method == method and manifest.lora.use_dora == (method == "dora")
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["use_dora"] == (method == "dora") and config["use_rslora"] == (method == "dora")


def test_outputs_and_manifest(trained, tiny_llama_path):
    settings, result = trained
    adapter = result.adapter_dir
    assert adapter == settings.data_dir / "tenants" / "acme" / "adapters" / "support-v1"
    assert {p.name for p in adapter.iterdir()} == {
        "adapter_model.safetensors", "adapter_config.json", "lorag_adapter.json", "loss.png", "train_log.jsonl"
    }
    assert (adapter / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = [json.loads(line) for line in (adapter / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 7))
    assert [r["step"] for r in log if "val_loss" in r] == [3, 6]

    manifest = read_manifest(adapter)
    from transformers import AutoConfig

    assert manifest.format_version == 1 and manifest.name == "support-v1" and manifest.tenant == "acme"
    assert manifest.base_model == str(tiny_llama_path)
    assert manifest.base_fingerprint == model_fingerprint(AutoConfig.from_pretrained(tiny_llama_path))
    assert manifest.lora.rank == 16 and manifest.lora.alpha == 32 and manifest.lora.target_modules == "all-linear"
    data = manifest.data
    assert (data.records, data.skipped, data.truncated, data.train, data.val) == (12, 0, 0, 9, 3)
    assert data.format == "openai" and len(data.sha256) == 64
    metrics = manifest.metrics
    assert metrics.steps == 6 and metrics.tokens_per_second > 0 and metrics.peak_memory_bytes > 0
    assert metrics.val_perplexity < metrics.base_val_perplexity  # the validation answers were seen in training
    assert {"torch", "transformers", "peft"} <= set(manifest.versions)
    assert manifest.prompt_format == PROMPT_FORMAT  # the prompt it learnt, checked when it is served
    assert not result.run_dir.exists()  # checkpoints are gone once the adapter is registered


def test_saved_adapter_loads_with_plain_peft_and_changes_the_output(trained, tiny_llama_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, result = trained
    ids = torch.tensor([[1, 5, 9, 30, 42, 7]])
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_path).eval()
    with torch.no_grad():
        before = base(input_ids=ids).logits
    model = PeftModel.from_pretrained(base, str(result.adapter_dir)).eval()
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert not torch.allclose(before, after, atol=1e-3)


def test_existing_name_is_refused(trained, memorise_file):
    settings, _ = trained
    with pytest.raises(Conflict, match="support-v1 already exists"):
        train_adapter(settings, tenant="acme", data_file=memorise_file, name="support-v1")


def test_early_stopping_keeps_the_best_adapter(data_dir, tmp_path, tiny_llama_path):
    train_file = write_openai_jsonl(tmp_path / "train.jsonl", MEMORISE)
    # Validation asks the same questions with contradicting answers: fitting the train set hurts it.
    val_file = write_openai_jsonl(tmp_path / "val.jsonl", [(q, "Nobody knows at all.") for q, _ in MEMORISE])
    settings = train_settings(data_dir, tiny_llama_path, max_steps=40, eval_steps=1, patience=2, lr=2e-2)
    result = train_adapter(settings, tenant="acme", data_file=train_file, val_file=val_file, name="early")
    metrics = result.manifest.metrics
    val = {r["step"]: r["val_loss"] for r in result.history if "val_loss" in r}
    assert metrics.stopped_early and metrics.steps < 40
    assert metrics.best_step == min(val, key=val.get) and metrics.steps - metrics.best_step == 2
    assert metrics.val_loss == pytest.approx(val[metrics.best_step], rel=1e-5)  # the best weights were saved


def test_patience_without_validation_data_is_refused(data_dir, memorise_file, tiny_llama_path):
    settings = train_settings(data_dir, tiny_llama_path, max_steps=2, patience=1, val_split=0.0)
    with pytest.raises(LoragError, match="--patience needs validation data"):
        train_adapter(settings, tenant="acme", data_file=memorise_file, name="p")


def test_resume_continues_the_exact_loss_sequence(data_dir, memorise_file, tiny_llama_path):
    data = write_openai_jsonl(memorise_file.parent / "more.jsonl", MEMORISE * 3)
    common = dict(max_steps=8, dropout=0.2, batch_size=2, grad_accum=2, warmup_ratio=0.25, val_split=0.25, eval_steps=3)
    straight = train_adapter(train_settings(data_dir, tiny_llama_path, **common), tenant="acme", data_file=data, name="straight")

    def interrupt(step, record):
        if step == 3:
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C does: the loop checkpoints and stops

    settings = train_settings(data_dir, tiny_llama_path, **common)
    first = train_adapter(settings, tenant="acme", data_file=data, name="resumed", on_step=interrupt)
    assert first.interrupted and first.step == 3 and first.adapter_dir is None
    assert (first.run_dir / "checkpoints" / "step-0000003" / "optimizer.pt").is_file()
    with pytest.raises(Conflict, match="--resume"):
        train_adapter(settings, tenant="acme", data_file=data, name="resumed")

    second = train_adapter(settings, tenant="acme", data_file=data, name="resumed", resume=True)
    assert not second.interrupted and second.step == 8
    assert second.losses == pytest.approx(straight.losses, rel=1e-6, abs=1e-7)
    val = [r["val_loss"] for r in second.history if "val_loss" in r]
    assert val == pytest.approx([r["val_loss"] for r in straight.history if "val_loss" in r], rel=1e-6)
    assert second.manifest.metrics.val_loss == pytest.approx(straight.manifest.metrics.val_loss, rel=1e-6)


def test_resume_with_changed_hyperparameters_is_refused(data_dir, memorise_file, tiny_llama_path):
    def interrupt(step, record):
        signal.raise_signal(signal.SIGINT)

    settings = train_settings(data_dir, tiny_llama_path, max_steps=4)
    assert train_adapter(settings, tenant="acme", data_file=memorise_file, name="r", on_step=interrupt).interrupted
    changed = train_settings(data_dir, tiny_llama_path, max_steps=4, lr=1e-3)
    with pytest.raises(LoragError, match="different hyperparameters"):
        train_adapter(changed, tenant="acme", data_file=memorise_file, name="r", resume=True)


def test_packing_trains_on_the_same_targets(data_dir, memorise_file, tiny_llama_path):
    settings = train_settings(data_dir, tiny_llama_path, max_steps=3, packing=True, batch_size=1)
    result = train_adapter(settings, tenant="acme", data_file=memorise_file, name="packed")
    assert result.manifest.data.train == len(MEMORISE) and len(result.losses) == 3


def test_qlora_without_cuda_fails_before_loading(data_dir, memorise_file, tiny_llama_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from lorag.cli import main

    code = main(["train", "--tenant", "acme", "--data", str(memorise_file), "--base", str(tiny_llama_path),
                 "--method", "qlora", "--data-dir", str(data_dir)])
    err = capsys.readouterr().err
    assert code == 2
    assert "lorag train: error: --method qlora needs a CUDA GPU" in err and "Traceback" not in err


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_gpu_training_in_bf16_and_4bit(method, memorise_file, data_dir, tiny_llama_path):
    settings = train_settings(data_dir, tiny_llama_path, method=method, max_steps=12, gradient_checkpointing=True,
                              target_modules="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head")
    result = train_adapter(settings, tenant="acme", data_file=memorise_file, name=method)
    assert sum(result.losses[-3:]) < 0.8 * sum(result.losses[:3])
    manifest = read_manifest(result.adapter_dir)
    assert manifest.method == method and manifest.metrics.peak_memory_bytes > 0
    assert manifest.hyperparameters["precision"] == "auto"


@pytest.mark.gpu
def test_gpu_compiled_layers_give_the_eager_losses(memorise_file, data_dir, tiny_llama_path):
    runs = {}
    for compile_layers in (False, True):
        settings = train_settings(data_dir, tiny_llama_path, max_steps=4, compile=compile_layers, dropout=0.0)
        runs[compile_layers] = train_adapter(settings, tenant="acme", data_file=memorise_file, name=f"c{compile_layers:d}").losses
    assert runs[True] == pytest.approx(runs[False], rel=2e-2)


def test_trained_adapter_and_training_runs_are_owner_only(trained):
    import stat

    settings, result = trained
    tenant = settings.data_dir / "tenants" / "acme"
    directories = [tenant, result.adapter_dir, result.run_dir.parent]
    assert all(d.is_dir() for d in directories)
    assert {str(d): oct(stat.S_IMODE(d.stat().st_mode)) for d in directories} == {str(d): "0o700" for d in directories}
    files = list(result.adapter_dir.iterdir())
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {f.name: "0o600" for f in files}


def test_the_train_command_leaves_its_process_group(data_dir, memorise_file, tiny_llama_path, capsys):
    # Under accelerate launch or torchrun each rank runs the command in a process group; the command ends it
    # (a group left to interpreter exit keeps gloo/NCCL threads alive, which can abort a rank).
    import socket

    import torch.distributed as dist

    from lorag.cli import main

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", world_size=1, rank=0, init_method=f"tcp://127.0.0.1:{port}")
    try:
        code = main(["train", "--tenant", "acme", "--data", str(memorise_file), "--base", str(tiny_llama_path),
                     "--data-dir", str(data_dir), "--max-steps", "1", "--val-split", "0", "--name", "grouped"])
        assert code == 0 and "adapter acme/grouped saved" in capsys.readouterr().out
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
