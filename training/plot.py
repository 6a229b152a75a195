"""The loss curve of a run (train and validation) as a PNG, drawn off-screen."""

from collections.abc import Sequence
from pathlib import Path


def plot_losses(history: Sequence[dict], path: Path, *, title: str = "") -> Path:
    """Draw training loss per step and validation loss per evaluation from the run's log records."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in tests
    from matplotlib import pyplot as plt

    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        if train:
            axes.plot(*zip(*train), label="train loss", linewidth=1.2)
        if val:
            axes.plot(*zip(*val), "o-", label="validation loss", linewidth=1.2)
        axes.set_xlabel("optimizer step")
        axes.set_ylabel("loss (nats per target token)")
        axes.set_title(title)
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        figure.savefig(path)
    finally:
        plt.close(figure)
    return Path(path)
