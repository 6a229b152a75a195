"""Resumable training checkpoints in a run directory, and the best-so-far adapter weights.

Tensors go to safetensors, counters and schedules to JSON; only the optimizer state (our own file,
never user data) uses ``torch.save``, and it is read back with ``weights_only=True``.
Each checkpoint directory appears by rename, complete, or not at all.

Checkpoints hold full (gathered) tensors whether or not the model is sharded: the main process writes
what :mod:`training.sharding` gathered, and a resumed run cuts it back into each process's shard.
"""

import json
import os
import random
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from core.atomic import fsync_path, write_atomically
from core.datadir import make_private_dir
from core.errors import LoragError

KEEP_CHECKPOINTS = 2


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path


@dataclass
class BestTracker:
    """The best validation loss so far and how many evaluations have passed without beating it."""

    step: int | None = None
    loss: float | None = None
    evals_since_best: int = 0

    def update(self, step: int, loss: float) -> bool:
        if self.loss is None or loss < self.loss:
            self.step, self.loss, self.evals_since_best = step, loss, 0
            return True
        self.evals_since_best += 1
        return False

    def to_dict(self) -> dict:
        return {"step": self.step, "loss": self.loss, "evals_since_best": self.evals_since_best}

    @classmethod
    def from_dict(cls, values: dict) -> "BestTracker":
        return cls(**values)


def latest(run_dir: Path) -> Checkpoint | None:
    """The newest complete checkpoint of a run, or None."""
    found = []
    for path in (Path(run_dir) / "checkpoints").glob("step-*"):
        if (path / "state.json").is_file() and path.name[5:].isdigit():
            found.append(Checkpoint(int(path.name[5:]), path))
    return max(found, key=lambda c: c.step, default=None)


def save(run_dir: Path, *, step: int, adapter: dict, optimizer_state: dict, scheduler, state: dict) -> Path:
    """Write adapter tensors, optimizer state, scheduler, RNG states and ``state`` as ``checkpoints/step-N``.

    ``adapter`` and ``optimizer_state`` are full (gathered) state dicts: see :mod:`training.sharding`.
    """
    import torch

    parent = Path(run_dir) / "checkpoints"
    make_private_dir(parent)
    target = parent / f"step-{step:07d}"
    tmp = make_private_dir(parent / f".tmp-{uuid.uuid4().hex[:8]}")
    try:
        save_adapter_weights(adapter, tmp, atomic=False)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        write_json(tmp / "scheduler.json", scheduler.state_dict())
        _save_rng(tmp)
        write_json(tmp / "state.json", state)
        for path in tmp.iterdir():
            fsync_path(path)
        old = None
        if target.exists():  # move aside before deleting: a kill mid-rmtree must not leave a torn step-N
            old = parent / f".old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
        os.rename(tmp, target)
        fsync_path(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    older = sorted(p for p in parent.glob("step-*") if p != target)
    for stale in older[: max(0, len(older) - (KEEP_CHECKPOINTS - 1))]:
        shutil.rmtree(stale, ignore_errors=True)
    return target


def load(path: Path, *, model, optimizer, scheduler, root=None) -> dict:
    """Restore a checkpoint written by :func:`save` into the live objects; returns its ``state``.

    ``model`` is the peft model; ``root`` the module the optimizer's sharding belongs to when it is sharded.
    Every process calls this (a sharded model takes its own shard of each tensor).
    """
    import torch

    from training.sharding import load_optimizer_state

    load_adapter_weights(model, path)
    try:
        load_optimizer_state(root if root is not None else model, optimizer,
                             torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    except Exception as error:  # torch raises several types for a corrupt or foreign file
        raise LoragError(f"checkpoint {str(path)!r}: cannot read optimizer.pt: {error}") from error
    scheduler.load_state_dict(read_json(path / "scheduler.json"))
    _load_rng(path)
    return read_json(path / "state.json")


def save_adapter_weights(tensors: dict, directory: Path, *, atomic: bool = True) -> None:
    """Full adapter tensors (:func:`training.sharding.gather_adapter`) as ``adapter_weights.safetensors`` in ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "adapter_weights.safetensors"
    tmp = directory / f".tmp-{uuid.uuid4().hex[:8]}.safetensors" if atomic else target
    try:
        save_file(tensors, str(tmp))
        if atomic:
            fsync_path(tmp)
            os.replace(tmp, target)
    except BaseException:
        if atomic:
            tmp.unlink(missing_ok=True)
        raise


def load_adapter_weights(model, directory: Path) -> None:
    """Put ``adapter_weights.safetensors`` from ``directory`` into the (plain or sharded) peft ``model``."""
    from safetensors.torch import load_file

    from training.sharding import load_adapter

    path = Path(directory) / "adapter_weights.safetensors"
    if not path.is_file():
        raise LoragError(f"adapter weights {str(path)!r} are missing")
    load_adapter(model, load_file(str(path)), source=str(path))


def remove_run(run_dir: Path) -> None:
    """Delete a finished run's checkpoints (the adapter now lives in the registry)."""
    shutil.rmtree(run_dir, ignore_errors=True)


def write_json(path: Path, value) -> None:
    write_atomically(path, json.dumps(value, indent=1))


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise LoragError(f"checkpoint file {str(path)!r} is unreadable: {error}") from error


def _save_rng(directory: Path) -> None:
    import torch
    from safetensors.torch import save_file

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{index}"] = state
    save_file(tensors, str(directory / "rng.safetensors"))
    version, internal, gauss = random.getstate()
    write_json(directory / "rng.json", {"python": [version, list(internal), gauss]})


def _load_rng(directory: Path) -> None:
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(directory / "rng.safetensors"))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors) - 1) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, internal, gauss = read_json(directory / "rng.json")["python"]
    random.setstate((version, tuple(internal), gauss))

