"""benchmarks/fsdp_train.py: its arguments, its report, and its code path run on CPU (gloo, tiny shape)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import fsdp_train  # noqa: E402


def test_arguments_take_the_shape_defaults_and_refuse_nonsense(capsys):
    args = fsdp_train.parse_args(["--shape", "llama3-70b", "--steps", "4", "--warmup", "1"])
    assert (args.batch, args.seq, args.method) == (1, 2048, "lora")
    assert fsdp_train.SHAPES["llama3-70b"]["shape"]["layers"] == 80
    dry = fsdp_train.parse_args(["--shape", "tiny", "--dry-run"])
    assert (dry.steps, dry.warmup) == (2, 0)
    with pytest.raises(SystemExit):
        fsdp_train.parse_args(["--steps", "2", "--warmup", "2"])
    assert "--warmup 2 leaves no timed step of --steps 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fsdp_train.parse_args(["--rank", "0"])
    with pytest.raises(SystemExit):
        fsdp_train.parse_args(["--shape", "llama3-70b", "--method", "qlora"])
    assert "the 70B step is --method lora" in capsys.readouterr().err


def test_report_gives_scaling_efficiency_against_one_gpu(tmp_path):
    def result(processes: int, tokens_per_s: float) -> Path:
        path = tmp_path / f"r{processes}.json"
        path.write_text(json.dumps({"shape": "llama3-8b", "method": "lora", "processes": processes,
                                    "tokens_per_s": tokens_per_s, "peak_memory_bytes_per_gpu": [2**31] * processes,
                                    "step_s_median": 1.0}))
        return path

    table = fsdp_train.report([result(2, 1800.0), result(1, 1000.0)]).splitlines()
    assert table[2].startswith("| llama3-8b | lora | 1 | 1000 | 1.00 | 2.0 |")
    assert table[3].startswith("| llama3-8b | lora | 2 | 1800 | 0.90 | 2.0 |")


@pytest.mark.slow
def test_dry_run_trains_a_tiny_sharded_model_on_two_cpu_processes(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    out = tmp_path / "tiny.json"
    completed = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "benchmarks/fsdp_train.py", "--shape", "tiny",
         "--dry-run", "--out", str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["processes"] == 2 and result["dry_run"] and result["steps"] == 2
    assert len(result["peak_memory_bytes_per_gpu"]) == 2
    # Random weights at init scale: the loss starts near ln(vocab), not at a garbage value from uninitialised memory.
    assert all(5.0 < loss < 7.5 for loss in result["losses"])


def test_without_cuda_a_measurement_is_refused():
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without CUDA")
    with pytest.raises(SystemExit, match="no CUDA device"):
        fsdp_train.main(["--shape", "tiny"])
