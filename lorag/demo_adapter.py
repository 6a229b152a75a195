"""The demo tenant's RAFT adapter: trained once on CPU from data/train/sample.jsonl on the server's own
retrieval-augmented prompt, then reused by every later demo run.

A few optimizer steps on a 135M model are enough to show the difference the adapter makes (short answers that
stay on the passages and cite them); benchmarks/RESULTS.md ("RAG + LoRA against RAG alone") has what a longer
run on real data does.
"""

import sys
from pathlib import Path

from core.errors import LoragError

ADAPTER_NAME = "demo-raft"
TRAINING_DATA = Path(__file__).resolve().parent.parent / "data" / "train" / "sample.jsonl"
# Sized for a CPU: a step over 2 examples of ~900 tokens costs about 1.5 TFLOP forward and backward, so 12 steps
# take a few minutes on two cores. Three passages instead of the four the demo asks with keep the prompts short;
# the adapter still learns the answer format (short, on the passages, cited). A GPU trains the full recipe.
DEMO_TRAINING = {
    "with_retrieval": True, "k": 3, "max_steps": 12, "batch_size": 2, "rank": 8, "alpha": 16, "lr": 5e-4,
    "max_seq_len": 1024, "val_split": 0.1, "precision": "fp32", "warmup_ratio": 0.0,
}


def demo_adapter(settings, *, tenant: str, base_model: str, retrieval, steps: int | None = None) -> str:
    """The name of ``tenant``'s demo adapter for ``base_model``, trained now unless a previous run left one.

    ``settings`` are the server's (its data dir is where the adapter is registered); ``retrieval`` the
    RetrievalService holding the tenant's ingested documents, which the RAFT examples are built from.

    Raises:
        LoragError: training failed (bad data, the base model cannot be loaded).
    """
    from adapters.registry import AdapterRegistry
    from core.settings import load_settings
    from training.recipe import train_adapter
    from training.settings import TrainSettings

    registry = AdapterRegistry(settings.data_dir)
    if ADAPTER_NAME in registry.names(tenant):
        manifest = registry.show(tenant, ADAPTER_NAME)
        if manifest.base_model == base_model:
            print(f"reusing adapter {tenant}/{ADAPTER_NAME} (trained earlier; delete it with "
                  f"`lorag adapters delete --tenant {tenant} {ADAPTER_NAME}` to train again)")
            return ADAPTER_NAME
        raise LoragError(
            f"adapter {tenant}/{ADAPTER_NAME} was trained on {manifest.base_model!r}, not on {base_model!r}",
            hint=f"delete it with `lorag adapters delete --tenant {tenant} {ADAPTER_NAME}` and run the demo again",
        )
    training = {**DEMO_TRAINING, "base_model": base_model}
    if steps is not None:
        training["max_steps"] = steps
    train_settings = load_settings(TrainSettings, data_dir=settings.data_dir, training=training)
    print(f"training adapter {tenant}/{ADAPTER_NAME} on {TRAINING_DATA.name} (RAFT: each question with the passages "
          "retrieval finds for it); a few minutes on a CPU, once ...", flush=True)
    result = train_adapter(train_settings, tenant=tenant, data_file=TRAINING_DATA, name=ADAPTER_NAME,
                           retrieval=retrieval, on_step=None if sys.stderr.isatty() else _print_step)
    if result.interrupted or result.manifest is None:
        raise LoragError(f"training of {tenant}/{ADAPTER_NAME} was interrupted at step {result.step}",
                         hint="run the demo again to start over")
    metrics = result.manifest.metrics
    print(f"adapter trained: {metrics.steps} steps, validation perplexity {metrics.base_val_perplexity:.1f} (base) "
          f"-> {metrics.val_perplexity:.1f} (adapter)")
    return ADAPTER_NAME


def _print_step(step: int, record: dict) -> None:
    # Without a terminal tqdm's bar is off; a line every few steps still shows the run is alive.
    if step == 1 or step % 5 == 0:
        print(f"  step {step}  loss {record['loss']:.3f}  {record['tokens_per_s']:.0f} tok/s", file=sys.stderr, flush=True)
