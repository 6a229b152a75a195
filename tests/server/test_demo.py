"""The README's main job, `python -m lorag.demo`, as a user runs it: offline with the packaged model standing in
for a hub model, with a local model, and without any model (it must say plainly that answers are extractive,
and still print cited passages)."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def _demo(data_dir, *args, **env) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "lorag.demo", "--data-dir", str(data_dir), *args],
        cwd=REPO_ROOT, env=os.environ | {"HF_HUB_OFFLINE": "1", **env},
        capture_output=True, text=True, timeout=1200,  # the packaged model trains its demo adapter on CPU
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_demo_offline_fallback_then_local_model(data_dir, tiny_llama_path):
    out = _demo(data_dir, LORAG_GENERATION__MODEL="Qwen/Qwen2.5-0.5B-Instruct", LORAG_GENERATION__FALLBACK="extractive")
    assert "FELL BACK TO EXTRACTIVE ANSWERS" in out
    assert "Q: How long is the warranty on a Kestrel Tide buoy?" in out
    assert "returns-and-warranty.txt page 1" in out  # the passage that answers it, cited with its page
    assert "/v1/passages/" in out
    assert "generator: extractive" in out

    # Second run on the same data dir: nothing to re-embed, and the local model is used; the tenant gets its
    # RAFT adapter, and the question is asked with RAG alone and with RAG + the adapter.
    out = _demo(data_dir, "--adapter-steps", "2", LORAG_GENERATION__MODEL=str(tiny_llama_path))
    assert "unchanged" in out and "FELL BACK" not in out
    assert "generator: transformers:" in out
    assert "training adapter demo/demo-raft" in out and "adapter trained: 2 steps" in out
    alone, _, with_adapter = out.partition("--- RAG + the tenant's adapter 'demo-raft' ---")
    assert "--- RAG alone (the base model) ---" in alone and "model: base" in alone
    assert "A: " in with_adapter and "model: demo-raft" in with_adapter

    # Third run: the adapter trained before is reused, not trained again.
    out = _demo(data_dir, LORAG_GENERATION__MODEL=str(tiny_llama_path))
    assert "reusing adapter demo/demo-raft" in out and "training adapter" not in out
    assert "model: demo-raft" in out


def test_demo_offline_generates_with_the_packaged_model(data_dir, packaged_model_path):
    # The hub model cannot be loaded offline: the packaged model (already converted in this models dir) answers.
    out = _demo(data_dir, "--adapter-steps", "1", LORAG_GENERATION__MODEL="Qwen/Qwen2.5-0.5B-Instruct",
                LORAG_GENERATION__MODELS_DIR=str(packaged_model_path.parent))
    assert "FELL BACK TO THE PACKAGED MODEL" in out and "EXTRACTIVE" not in out
    assert f"generator: transformers:.../{packaged_model_path.name}" in out and str(packaged_model_path) not in out
    answers = [line for line in out.splitlines() if line.startswith("A: ")]
    assert len(answers) == 2 and all(len(answer) > len("A: ") + 5 for answer in answers)  # RAG alone, RAG + adapter
    assert "model: base" in out and "model: demo-raft" in out
    assert "returns-and-warranty.txt page 1" in out  # the passage that answers it, cited or shown with its page
    assert "/v1/passages/" in out
