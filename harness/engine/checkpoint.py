"""Checkpoints: written atomically, loaded with `weights_only=True` (DESIGN.md "Conventions").

A checkpoint holds model, optimizer, scheduler and grad-scaler states, the finished epoch, the global
step, the RNG states (torch CPU, CUDA, Python `random`), the resolved recipe and the MLflow run id.
`save_atomic` writes to a temporary file in the same folder, fsyncs and renames it over the target, so
a crash leaves either the previous checkpoint or the new one, never a truncated file.
"""

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

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
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holding objects weights_only refuses
        raise CheckpointError(f"{path}: not a readable harness checkpoint ({type(e).__name__})") from None


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
