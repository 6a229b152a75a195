"""``lorag train`` for a few steps on the real packaged model and its real tokenizer (ChatML, tied embeddings)."""

import json
import math

import pytest

from lorag.cli import main
from tests.training.conftest import MEMORISE, write_openai_jsonl

pytestmark = pytest.mark.slow


def test_train_cli_runs_on_the_packaged_model(packaged_model_path, tmp_path, capsys):
    from transformers import AutoConfig

    from adapters.manifest import model_fingerprint, read_manifest

    data = write_openai_jsonl(tmp_path / "train.jsonl", MEMORISE)
    code = main(["train", "--tenant", "acme", "--data", str(data), "--base", str(packaged_model_path),
                 "--name", "smol", "--max-steps", "2", "--batch-size", "2", "--max-seq-len", "128", "--rank", "4",
                 "--val-split", "0", "--data-dir", str(tmp_path / "data")])
    out, err = capsys.readouterr()
    assert code == 0, err
    adapter = tmp_path / "data" / "tenants" / "acme" / "adapters" / "smol"
    assert f"adapter acme/smol saved to {adapter}" in out

    manifest = read_manifest(adapter)
    assert manifest.base_model == str(packaged_model_path) and manifest.metrics.steps == 2
    assert manifest.base_fingerprint == model_fingerprint(AutoConfig.from_pretrained(packaged_model_path))
    losses = [json.loads(line)["loss"] for line in (adapter / "train_log.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    # A real instruct model already knows how to answer in turns: its loss starts low, not at log(vocab) ~ 10.8.
    assert len(losses) == 2 and all(math.isfinite(loss) and 0 < loss < 8 for loss in losses)
