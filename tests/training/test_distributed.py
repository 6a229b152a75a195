"""Data parallel without code changes: `torchrun --nproc_per_node 2 -m lorag.cli train` on CPU (gloo)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapters.manifest import read_manifest
from tests.conftest import REPO_ROOT


@pytest.mark.slow
def test_two_process_data_parallel_training(tmp_path, tiny_llama_path, memorise_file):
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "lorag.cli", "train", "--tenant", "acme",
         "--data", str(memorise_file), "--base", str(tiny_llama_path), "--data-dir", str(tmp_path / "data"),
         "--name", "ddp", "--max-steps", "2", "--batch-size", "1", "--val-split", "0.25"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("adapter acme/ddp saved") == 1  # only the main process saves and reports
    adapters = tmp_path / "data" / "tenants" / "acme" / "adapters"
    assert [p.name for p in adapters.iterdir()] == ["ddp"]
    manifest = read_manifest(adapters / "ddp")
    assert manifest.metrics.steps == 2 and manifest.data.train == 3
