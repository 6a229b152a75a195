"""Training fixtures: a tiny memorisable data set and one adapter trained once for the module tests."""

import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"

MEMORISE = [
    ("How long is the warranty?", "Three years."),
    ("What is the default interval?", "Ten minutes."),
    ("Who makes the buoy?", "Kestrel Instruments."),
    ("What does the red LED mean?", "No network."),
]


def write_openai_jsonl(path: Path, pairs) -> Path:
    with open(path, "w", encoding="utf-8") as file:
        for question, answer in pairs:
            record = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
            file.write(json.dumps(record) + "\n")
    return path


@pytest.fixture
def memorise_file(tmp_path) -> Path:
    return write_openai_jsonl(tmp_path / "memorise.jsonl", MEMORISE)


def train_settings(data_dir: Path, base: Path, **training):
    from training.settings import TrainingSettings, TrainSettings

    defaults = dict(base_model=str(base), lr=1e-2, batch_size=2, max_seq_len=256, val_split=0.0, epochs=1, warmup_ratio=0.0)
    defaults.update(training)
    return TrainSettings(data_dir=data_dir, training=TrainingSettings(**defaults))


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_llama_path):
    """One LoRA adapter trained for a few steps with a validation split: (settings, result)."""
    import torch

    from training.recipe import train_adapter

    root = tmp_path_factory.mktemp("trained")
    data = write_openai_jsonl(root / "train.jsonl", MEMORISE * 3)
    settings = train_settings(root / "data", tiny_llama_path, val_split=0.25, max_steps=6, eval_steps=3)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # see _one_torch_thread
    try:
        result = train_adapter(settings, tenant="acme", data_file=data, name="support-v1")
    finally:
        torch.set_num_threads(previous)
    return settings, result


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(one_torch_thread):
    """Every module here trains or runs tiny models."""
