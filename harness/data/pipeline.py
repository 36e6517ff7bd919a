"""From a recipe's `data` section to the two loaders a run iterates (DESIGN.md: FFCV where installed,
a torch DataLoader otherwise).

`build_pipeline(cfg, seed, rank, world_size, device)` -> `Pipeline`; the global `cfg.batch_size` is split
exactly over the `world_size` processes (`per_process_batch` refuses a batch that does not divide, so a
recipe trains the same global batch on any number of processes); evaluation batches are split rounding
up (they only partition the validation set). `set_epoch(loader, e)` must be called before each pass.
`cfg.loader`: `torch` reads the data set under `cfg.root`; `ffcv` reads the `.beton` files `cfg.train`
and `cfg.val` (harness/data/ffcv.py); `auto` takes ffcv when it imports and both files are given and
written, else torch (so a recipe may name the .beton files it prefers before they exist). `Pipeline.note`
says which loader it took and why; `harness launch` prints it once.
`cfg.holdout` (tuning): a fraction h of the training split, drawn by a permutation seeded with
`cfg.holdout_seed` (first round(h*N) indices of it, not augmented), replaces the validation split; the rest
trains. Torch loader only (a .beton is read whole).
"""

import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from harness.data.loaders import build_loaders
from harness.data.registry import DATASETS, DataError, DataSplits, build_datasets


@dataclass
class Pipeline:
    train: Any  # iterable of (x, y) batches, with len()
    val: Any
    num_classes: int
    input_shape: tuple[int, ...]
    train_size: int  # samples in the training split (all processes)
    kind: str  # "torch" or "ffcv"
    note: str = ""  # which loader and why, for the run's first line


def per_process_batch(batch_size: int, world_size: int, grad_accum: int = 1) -> int:
    """Samples per process per forward: data.batch_size / (processes * engine.grad_accum), exactly."""
    parts = world_size * grad_accum
    if batch_size % parts:
        split = f"{world_size} processes" + (f" x engine.grad_accum {grad_accum}" if grad_accum > 1 else "")
        raise DataError(f"data.batch_size: {batch_size} does not split evenly over {split}; use a multiple of "
                        f"{parts} (the global batch is trained exactly, never rounded)")
    return batch_size // parts


def per_process_eval_batch(batch_size: int, world_size: int) -> int:
    return -(-batch_size // world_size)


def ffcv_import_error() -> str | None:
    """Why `harness.data.ffcv` cannot be imported, or None when it can."""
    try:
        import harness.data.ffcv  # noqa: F401
    except ImportError as error:
        return f"{type(error).__name__}: {error}"
    return None


def choose_loader(cfg) -> tuple[str, str]:
    """`(kind, reason)`: the loader `cfg` (a DataConfig) asks for, resolved against what is installed."""
    betons = cfg.train is not None and cfg.val is not None
    if cfg.loader == "torch":
        return "torch", "data.loader: torch"
    if cfg.holdout is not None:
        if cfg.loader == "ffcv":
            raise DataError(f"data.holdout: {cfg.holdout} needs the torch loader (a .beton is read whole); set "
                            f"data.loader: torch or auto, or drop data.holdout")
        return "torch", "data.holdout carves a validation split from the training data"
    if cfg.loader == "ffcv":
        if not betons:
            raise DataError(f"data.loader: ffcv needs data.train and data.val .beton files (got train {cfg.train}, "
                            f"val {cfg.val}); write them with harness data write-ffcv")
        missing = ffcv_import_error()
        if missing:
            raise DataError(f"data.loader: ffcv asked for, but ffcv does not import ({missing}); install the ffcv "
                            f"extra or use loader torch")
        return "ffcv", "data.loader: ffcv"
    if not betons:
        return "torch", "data.loader auto: data.train/data.val .beton files not given"
    missing = ffcv_import_error()
    if missing:
        return "torch", f"data.loader auto: ffcv does not import ({missing})"
    absent = [f"{name} {path}" for name, path in (("data.train", cfg.train), ("data.val", cfg.val))
              if not Path(path).is_file()]
    if absent:
        return "torch", (f"data.loader auto: {' and '.join(absent)} not written yet; write them once with "
                         f"harness data write-ffcv (the torch loader decodes every sample again each epoch)")
    return "ffcv", "data.loader auto: ffcv imports and .beton files are given"


def dataset_options(cfg) -> dict[str, int]:
    """Extra builder arguments: `frames` for event data sets, which take it and need it."""
    if cfg.dataset not in DATASETS:
        return {}
    takes_frames = "frames" in inspect.signature(DATASETS[cfg.dataset]).parameters
    if cfg.frames is not None and not takes_frames:
        raise DataError(f"data.frames: {cfg.frames} set, but dataset {cfg.dataset!r} is not an event data set "
                        f"(frames apply to dvs_cifar10)")
    return {"frames": cfg.frames} if takes_frames else {}


def holdout_splits(splits: DataSplits, unaugmented_train, fraction: float, seed: int) -> DataSplits:
    """`splits` with a held-out validation split: indices `perm[:n]` of the training split (read from
    `unaugmented_train`, the same samples without augmentation) with `n = round(fraction * N)` and `perm` a
    permutation of `range(N)` seeded with `seed`; training keeps `perm[n:]`. Each part is in index order."""
    size = len(splits.train)
    held = round(fraction * size)
    if not 0 < held < size:
        raise DataError(f"data.holdout: {fraction} of {size} training samples leaves {held} to validate on and "
                        f"{size - held} to train; both must be at least 1")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    val, train = order[:held].sort().values.tolist(), order[held:].sort().values.tolist()
    return dataclasses.replace(splits, train=Subset(splits.train, train), val=Subset(unaugmented_train, val))


def build_ffcv_pipeline(cfg, seed: int, rank: int, world_size: int, device: torch.device | None = None) -> Pipeline:
    from harness.data.ffcv import FfcvLoader, beton_labels, spec_for

    spec = spec_for(cfg.dataset, "data.dataset")
    frames = dataset_options(cfg).get("frames")
    if spec.field == "frames" and frames is None:
        raise DataError(f"{cfg.dataset} (file {cfg.train}): needs data.frames, the number of frames T per sample "
                        f"(equal to method.T)")
    common = dict(dataset=cfg.dataset, workers=cfg.workers, seed=seed, rank=rank, world_size=world_size,
                  frames=frames, device=device)
    train = FfcvLoader(cfg.train, batch_size=per_process_batch(cfg.batch_size, world_size), train=True,
                       augment=cfg.augment, **common)
    val = FfcvLoader(cfg.val, batch_size=per_process_eval_batch(cfg.eval_batch_size or cfg.batch_size, world_size),
                     train=False, augment=False, **common)
    num_classes = spec.num_classes or int(beton_labels(train.reader).max()) + 1
    size = spec.input_size
    input_shape = (frames, 2, size, size) if spec.field == "frames" else (3, size, size)
    return Pipeline(train, val, num_classes, input_shape, train.num_samples, "ffcv")


def build_pipeline(cfg, seed: int, rank: int = 0, world_size: int = 1, device: torch.device | None = None) -> Pipeline:
    """Loaders for the recipe section `cfg` (a `harness.recipe.DataConfig`); `device`, the run's: FFCV hands a
    CUDA device its batches there (uint8 images normalised on it), the torch loaders pin theirs for a
    non-blocking copy."""
    kind, reason = choose_loader(cfg)
    if kind == "ffcv":
        pipeline = build_ffcv_pipeline(cfg, seed, rank, world_size, device)
    else:
        splits = build_datasets(cfg.dataset, cfg.root, augment=cfg.augment, **dataset_options(cfg))
        if cfg.holdout is not None:
            plain = splits if not cfg.augment else build_datasets(cfg.dataset, cfg.root, augment=False,
                                                                  **dataset_options(cfg))
            splits = holdout_splits(splits, plain.train, cfg.holdout, cfg.holdout_seed)
        train, val = build_loaders(splits, per_process_batch(cfg.batch_size, world_size),
                                   per_process_eval_batch(cfg.eval_batch_size or cfg.batch_size, world_size),
                                   cfg.workers, seed, rank=rank, world_size=world_size)
        pipeline = Pipeline(train, val, splits.num_classes, tuple(splits.input_shape), len(splits.train), "torch")
    on_gpu = kind == "ffcv" and device is not None and device.type == "cuda"
    pipeline.note = f"{cfg.dataset} through the {kind} loader ({reason})" + (
        f"; batches decoded on the CPU, moved to {device} as they are and normalised there" if on_gpu else "")
    return pipeline
