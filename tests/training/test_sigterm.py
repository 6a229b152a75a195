"""SIGTERM (what a scheduler, ``docker stop`` or Kubernetes sends) during `lorag train` saves a resumable checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from adapters.manifest import read_manifest
from tests.conftest import REPO_ROOT
from tests.training.conftest import MEMORISE, write_openai_jsonl

STEPS = 300


def train_command(data, base, data_dir, *extra) -> list[str]:
    return [sys.executable, "-m", "lorag.cli", "train", "--tenant", "acme", "--data", str(data), "--base", str(base),
            "--data-dir", str(data_dir), "--name", "sched", "--max-steps", str(STEPS), "--batch-size", "2",
            "--val-split", "0", *extra]


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_finishes(tmp_path, tiny_llama_path):
    data = write_openai_jsonl(tmp_path / "train.jsonl", MEMORISE)
    data_dir = tmp_path / "data"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    step_log = data_dir / "tenants" / "acme" / "training" / "sched" / "train_log.jsonl"
    process = subprocess.Popen(train_command(data, tiny_llama_path, data_dir), cwd=REPO_ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300  # a hang guard, not a speed expectation
    while not (step_log.is_file() and step_log.read_text().strip()):
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "training never logged a step"
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)

    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "SIGTERM: saving a checkpoint" in stderr and "--resume" in stderr
    assert "Traceback" not in stderr
    checkpoints = sorted((step_log.parent / "checkpoints").glob("step-*"))
    assert checkpoints and (checkpoints[-1] / "optimizer.pt").is_file()
    stopped_at = int(checkpoints[-1].name.split("-")[1])
    assert 1 <= stopped_at < STEPS
    assert not (data_dir / "tenants" / "acme" / "adapters" / "sched").exists()

    resumed = subprocess.run(train_command(data, tiny_llama_path, data_dir, "--resume"), cwd=REPO_ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    adapter = data_dir / "tenants" / "acme" / "adapters" / "sched"
    assert read_manifest(adapter).metrics.steps == STEPS
    # The adapter keeps the run's step log: resumed after the checkpoint, no step lost or repeated.
    steps = [json.loads(line)["step"] for line in (adapter / "train_log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == list(range(1, STEPS + 1))
