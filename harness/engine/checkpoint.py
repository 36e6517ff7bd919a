"""Checkpoints: written atomically, checksummed, loaded without executing code (DESIGN.md "Conventions").

`last.pt` holds the engine's part (model, optimizer, scheduler and grad-scaler states; under DeepSpeed the
tag of its partitioned part and the SHA-256 of each of that tag's files), the loop's counters (finished
epoch, global step, steps done in the current epoch, best top-1, skipped-step counts), the current epoch's
partial training totals when written mid-epoch, the RNG states (torch CPU, Python `random`, and the CUDA
generator of this process's GPU only: `rng_state`), the resolved recipe and the MLflow run id; `best.pt` the
model, recipe, epoch and best top-1.
`Checkpointer.save` asks the engine for its part on every rank (a collective under DeepSpeed), refuses to
write weights that are not finite (the previous checkpoint stays the last good one), then rank 0 writes the
files and only then lets the engine prune older parts.

Integrity. Every file carries `format` (FORMAT) and `sha256`, the SHA-256 of its content (`content_digest`:
a canonical walk over the nested dicts/lists, hashing each key, each scalar's type and value and each
tensor's dtype, shape and bytes), verified by `load`; torch's zip reader does not check its CRCs, so without
it a file with zeroed bytes in a tensor loads "fine". `load` refuses, in one line naming the file, a missing
file, a truncated or non-torch file, one holding objects that `weights_only=True` will not build (no code is
executed while loading), a file without our format (foreign), and one whose content no longer matches its
checksum (corrupted). `save_atomic` writes to a temporary file in the same folder, fsyncs it, renames it
over the target and fsyncs the folder, so a crash (SIGKILL, power loss) at any moment leaves either the
previous checkpoint or the new one, never a partial file under the checkpoint's name; temporary files left
by a killed writer are removed by the next `Checkpointer` of that folder.
"""

import hashlib
import os
import random
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch

from harness.engine.distributed import ProcessInfo, all_reduce_sum, barrier
from harness.errors import HarnessError

LAST = "last.pt"
BEST = "best.pt"
FORMAT = "dsr-harness-checkpoint/2"
_TEMPORARY = ".*.pt.*.tmp"  # what save_atomic's temporary files look like


class CheckpointError(HarnessError):
    pass


# ---------------------------------------------------------------------------------------------- integrity
def _feed(h: "hashlib._Hash", value: Any) -> None:
    """Hash `value` canonically: a type tag, then the content (dict keys in sorted order of their repr)."""
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous().reshape(-1)
        h.update(b"T" + f"{t.dtype}|{tuple(value.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        h.update(b"D" + struct.pack("<q", len(value)))
        for key in sorted(value, key=repr):
            _feed(h, key)
            _feed(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update((b"L" if isinstance(value, list) else b"U") + struct.pack("<q", len(value)))
        for item in value:
            _feed(h, item)
    elif isinstance(value, (bool, int, float, str, bytes, type(None), torch.dtype, torch.Size)):
        h.update(b"S" + f"{type(value).__name__}:{value!r}|".encode())
    else:
        raise TypeError(f"cannot checksum a {type(value).__name__} in a checkpoint")


def content_digest(state: dict[str, Any]) -> str:
    """The SHA-256 (hex) of a checkpoint's content, its `format` and `sha256` entries excluded."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k not in ("format", "sha256")})
    return h.hexdigest()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_atomic(state: dict[str, Any], path: str | Path) -> None:
    """Write `state` (with its `format` and `sha256`) to `path`: temporary file, fsync, rename, fsync folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stamped = {**state, "format": FORMAT, "sha256": content_digest(state)}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(stamped, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def load(path: str | Path, require_checksum: bool = True) -> dict[str, Any]:
    """The verified content of checkpoint `path` (CheckpointError, one line naming it, if it is not one).

    `require_checksum=False` also accepts a plain torch dict without our format (e.g. an ANN's state dict
    from elsewhere), still loaded with `weights_only=True`; one that has a checksum is always verified."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("checkpoint not found" if not path.exists() else "not a file", file=path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holding objects weights_only refuses
        raise CheckpointError(f"not a readable harness checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160] if str(e) else 'no detail'})", file=path) from None
    if not isinstance(state, dict) or "sha256" not in state:
        if require_checksum:
            raise CheckpointError(f"not a dsr-harness checkpoint: no {FORMAT!r} checksum (a file from elsewhere, "
                                  "or written before checkpoints were checksummed)", file=path)
        return state
    if state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint format {state.get('format')!r}, this harness reads {FORMAT!r}", file=path)
    try:
        actual = content_digest(state)
    except TypeError as e:
        raise CheckpointError(f"corrupted: {e}", file=path) from None
    if actual != state["sha256"]:
        raise CheckpointError(f"corrupted: its content does not match its checksum (stored sha256 "
                              f"{str(state['sha256'])[:12]}..., content {actual[:12]}...); use an older copy or "
                              "start again", file=path)
    return {k: v for k, v in state.items() if k not in ("format", "sha256")}


def verify_files(manifest: dict[str, str], folder: Path) -> None:
    """Check the files a checkpoint names (DeepSpeed's part: relative path -> SHA-256) before loading them."""
    for relative, expected in manifest.items():
        path = folder / relative
        if not path.is_file():
            raise CheckpointError(f"file {relative} of this checkpoint is missing", file=folder)
        if file_digest(path) != expected:
            raise CheckpointError(f"corrupted: file {relative} does not match the checksum last.pt holds", file=folder)


def first_nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, if any."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


# ---------------------------------------------------------------------------------------------- RNG
def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """The RNG states a resume restores: torch's CPU generator, Python's `random`, and, on a CUDA `device`, the
    generator of that one device (this process's GPU), never one per visible GPU: a job resumed where each
    process sees fewer GPUs (8 per torchrun node before, one per srun task after) must still find its own."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore `rng_state`'s states; the CUDA one into `device` (this process's GPU) when both exist. A
    checkpoint written before this format holds one state per GPU that was visible (a list): the one of
    `device`'s index is taken if it was saved, else the CUDA generator keeps its seed."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if cuda is None or device is None or device.type != "cuda":
        return
    if isinstance(cuda, (list, tuple)):
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)


# ---------------------------------------------------------------------------------------------- writing
class Checkpointer:
    """Writes a run folder's `last.pt` after each epoch and at step boundaries (`engine.checkpoint_every`,
    preemption), and `best.pt` on a new best.

    Args:
        run_dir: the run folder.
        process: this process (rank 0 writes the files; every rank takes part in the engine's part).
    """

    def __init__(self, run_dir: Path, process: ProcessInfo):
        self.run_dir, self.process = Path(run_dir), process
        if process.is_main and self.run_dir.is_dir():  # left by a writer that was killed
            for stale in self.run_dir.glob(_TEMPORARY):
                stale.unlink(missing_ok=True)

    def save(self, engine, counters: dict[str, Any], recipe: dict[str, Any], mlflow_run_id: str | None,
             is_best: bool = False, partial_epoch: dict[str, Any] | None = None) -> None:
        """Write `last.pt` (and `best.pt` if `is_best`); `partial_epoch` holds a mid-epoch checkpoint's
        training totals so far. Raises `NonFiniteError` (writing nothing) if a weight is not finite."""
        from harness.engine.engines.base import NonFiniteError

        tag = f"epoch{counters['epoch']}" + (f"-step{counters['step']}" if partial_epoch else "")
        part = engine.checkpoint_state(self.run_dir, tag)
        bad = first_nonfinite(part["model"])  # every rank, so that all raise together
        anywhere = all_reduce_sum(torch.tensor([float(bad is not None)], device=engine.device), self.process)
        if bool(anywhere.item()):
            raise NonFiniteError(f"after step {counters['step']} the weight {bad or '(on another rank)'} is not "
                                 f"finite (NaN or infinity); no checkpoint written, {self.run_dir / LAST} is the last "
                                 "good one: lower optim.lr or set optim.grad_clip")
        if self.process.is_main:
            if "deepspeed" in part:
                folder = self.run_dir / part["deepspeed"]["folder"]
                part["deepspeed"]["files"] = {str(p.relative_to(folder)): file_digest(p)
                                              for p in sorted(folder.joinpath(tag).rglob("*")) if p.is_file()}
            state = {**part, **counters, "rng": rng_state(engine.device), "recipe": recipe,
                     "mlflow_run_id": mlflow_run_id, "partial_epoch": partial_epoch}
            save_atomic(state, self.run_dir / LAST)
            if is_best:
                save_atomic({"model": part["model"], "recipe": recipe, "epoch": counters["epoch"],
                             "best_acc1": counters["best_acc1"]}, self.run_dir / BEST)
            engine.prune(self.run_dir, keep=tag)
        barrier(self.process)
