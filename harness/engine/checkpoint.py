"""Checkpoints: written atomically, loaded with `weights_only=True` (DESIGN.md "Conventions").

`last.pt` holds the engine's part (model, optimizer, scheduler and grad-scaler states; under DeepSpeed the
tag of its partitioned part), the loop's counters (finished epoch, global step, best top-1), the RNG
states (torch CPU, CUDA, Python `random`), the resolved recipe and the MLflow run id; `best.pt` the model,
recipe, epoch and best top-1. `Checkpointer.save` asks the engine for its part on every rank (a collective
under DeepSpeed), then rank 0 writes the files and only then lets the engine prune older parts.
`save_atomic` writes to a temporary file in the same folder, fsyncs and renames it over the target, so
a crash leaves either the previous checkpoint or the new one, never a truncated file.
"""

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

from harness.engine.distributed import ProcessInfo, barrier
from harness.errors import HarnessError

LAST = "last.pt"
BEST = "best.pt"


class CheckpointError(HarnessError):
    pass


def save_atomic(state: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint not found", file=path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holding objects weights_only refuses
        raise CheckpointError(f"not a readable harness checkpoint ({type(e).__name__})", file=path) from None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Writes a run folder's `last.pt` (and `best.pt` on a new best) after each epoch.

    Args:
        run_dir: the run folder.
        process: this process (rank 0 writes the files; every rank takes part in the engine's part).
    """

    def __init__(self, run_dir: Path, process: ProcessInfo):
        self.run_dir, self.process = Path(run_dir), process

    def save(self, engine, counters: dict[str, Any], recipe: dict[str, Any], mlflow_run_id: str | None,
             is_best: bool) -> None:
        tag = f"epoch{counters['epoch']}"
        part = engine.checkpoint_state(self.run_dir, tag)
        if self.process.is_main:
            state = {**part, **counters, "rng": rng_state(), "recipe": recipe, "mlflow_run_id": mlflow_run_id}
            save_atomic(state, self.run_dir / LAST)
            if is_best:
                save_atomic({"model": part["model"], "recipe": recipe, "epoch": counters["epoch"],
                             "best_acc1": counters["best_acc1"]}, self.run_dir / BEST)
            engine.prune(self.run_dir, keep=tag)
        barrier(self.process)
