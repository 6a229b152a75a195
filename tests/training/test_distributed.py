"""Data parallel without code changes: `torchrun --nproc_per_node 2 -m lorag.cli train` on CPU (gloo)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapters.manifest import read_manifest
from tests.conftest import REPO_ROOT
from tests.training.conftest import MEMORISE, train_settings, write_openai_jsonl


@pytest.mark.slow
def test_two_process_data_parallel_training(tmp_path, tiny_llama_path):
    from training.recipe import train_adapter

    data = write_openai_jsonl(tmp_path / "train.jsonl", MEMORISE * 2)  # 6 training rows: 3 per process per epoch

    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "lorag.cli", "train", "--tenant", "acme",
         "--data", str(data), "--base", str(tiny_llama_path), "--data-dir", str(tmp_path / "data"),
         "--name", "ddp", "--max-steps", "2", "--batch-size", "1", "--val-split", "0.25", "--dropout", "0",
         "--lr", "1e-2", "--max-seq-len", "256", "--warmup-ratio", "0"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("adapter acme/ddp saved") == 1  # only the main process saves and reports
    adapters = tmp_path / "data" / "tenants" / "acme" / "adapters"
    assert [p.name for p in adapters.iterdir()] == ["ddp"]
    manifest = read_manifest(adapters / "ddp")
    assert manifest.metrics.steps == 2 and manifest.data.train == 6

    # One process with both processes' rows in each batch: the same losses. The processes' examples have
    # different numbers of answer tokens, so this holds only when each step is normalised by the target
    # tokens of all processes together (a mean of per-process means would differ).
    single = train_adapter(train_settings(tmp_path / "one", tiny_llama_path, max_steps=2, batch_size=2, val_split=0.25,
                                          dropout=0.0), tenant="acme", data_file=data, name="one")
    lines = (adapters / "ddp" / "train_log.jsonl").read_text().splitlines()
    logged = [record for record in map(json.loads, lines) if "loss" in record]
    assert [record["loss"] for record in logged] == pytest.approx(single.losses, rel=1e-5)
    assert manifest.metrics.val_loss == pytest.approx(single.manifest.metrics.val_loss, rel=1e-5)
