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


def test_replay_mixes_the_base_models_own_answers_into_training(packaged_model_path, tmp_path):
    from core.prompt import build_prompt
    from training.recipe import LoraFinetuneRecipe
    from training.replay import CACHE_FILE
    from tests.training.conftest import train_settings

    data = write_openai_jsonl(tmp_path / "train.jsonl", MEMORISE)
    prompts = tmp_path / "general.jsonl"
    questions = ["What is the capital of France?", "How many days are there in a week?",
                 "What colour is the sky on a clear day?", "Name a large mammal that lives in the ocean."]
    prompts.write_text("".join(json.dumps({"question": q}) + "\n" for q in questions) + "not json\n")
    settings = train_settings(tmp_path / "data", packaged_model_path, replay_data=str(prompts), replay_share=0.5,
                              replay_max_tokens=48, max_seq_len=384, max_steps=1, precision="fp32")

    recipe = LoraFinetuneRecipe(settings, tenant="acme", name="replay", resume=False)
    recipe.setup(data_file=data, val_file=None)
    cache = recipe.run_dir / CACHE_FILE
    replayed = [json.loads(line) for line in cache.read_text().splitlines()]
    # share 0.5: as many replayed answers as training examples, at most the 4 usable prompts (the bad line is skipped)
    assert 1 <= len(replayed) <= min(4, len(MEMORISE))
    assert recipe.counts["train"] == len(MEMORISE) + len(replayed)
    for conversation in replayed:
        question = conversation[-2]["content"]
        # the server's prompt without passages, as a request without retrieval gets it, then the base's own answer
        assert conversation[:-1] == build_prompt([{"role": "user", "content": question}], []).messages
        assert conversation[-1]["role"] == "assistant" and conversation[-1]["content"].strip()

    # a resumed run trains on the cached answers instead of generating new ones
    from training.replay import replay_conversations

    cached = [*replayed[0][:-1], {"role": "assistant", "content": "a cached answer"}]
    cache.write_text(json.dumps(cached) + "\n")
    assert replay_conversations(questions, base_path="unused: read from the cache", tokenizer=None, max_new_tokens=48,
                                run_dir=recipe.run_dir, write_cache=False, device="cpu") == [cached]
    # a new run (not resumed) answers its own prompts again rather than trusting another run's cache
    fresh = replay_conversations(questions[:1], base_path=str(packaged_model_path), tokenizer=recipe.tokenizer,
                                 max_new_tokens=48, run_dir=recipe.run_dir, write_cache=False, device="cpu",
                                 reuse_cache=False)
    assert all(c[-1]["content"] != "a cached answer" and c[-2]["content"] == questions[0] for c in fresh)
