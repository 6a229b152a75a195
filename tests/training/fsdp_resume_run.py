"""Run under `accelerate launch`: an FSDP training run stopped by SIGINT at a step, then resumed with --resume.

Both halves run in this process group; the checkpoint the first half wrote is copied to OUT for inspection
(the resumed run deletes its run directory once the adapter is saved).

    accelerate launch --config_file configs/accelerate/fsdp.yaml tests/training/fsdp_resume_run.py \
        DATA_DIR BASE DATA NAME OUT
"""

import shutil
import signal
import sys
from pathlib import Path

# Shared with the single-process reference run in test_fsdp.py; batch_size is per process.
SETTINGS = dict(max_steps=4, lr=1e-2, dropout=0.0, grad_accum=2, val_split=0.25, eval_steps=2, warmup_ratio=0.0,
                max_seq_len=256, epochs=1)
INTERRUPT_AT = 2


def settings(data_dir: Path, base: Path, batch_size: int):
    from training.settings import TrainingSettings, TrainSettings

    return TrainSettings(data_dir=data_dir, training=TrainingSettings(base_model=str(base), batch_size=batch_size, **SETTINGS))


def main(data_dir: str, base: str, data: str, name: str, out: str) -> None:
    from training import checkpoints
    from training.recipe import train_adapter

    def interrupt(step, record):
        if step == INTERRUPT_AT:
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C does: every process checkpoints and stops

    config = settings(Path(data_dir), Path(base), batch_size=1)
    first = train_adapter(config, tenant="acme", data_file=data, name=name, on_step=interrupt)
    assert first.interrupted and first.step == INTERRUPT_AT, (first.interrupted, first.step)
    latest = checkpoints.latest(first.run_dir)
    if first.run_dir.parent.exists() and latest is not None:
        import torch.distributed as dist

        if dist.get_rank() == 0:
            shutil.copytree(latest.path, Path(out) / "checkpoint")
    second = train_adapter(config, tenant="acme", data_file=data, name=name, resume=True)
    assert not second.interrupted and second.step == SETTINGS["max_steps"]


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO)
    main(*sys.argv[1:])
