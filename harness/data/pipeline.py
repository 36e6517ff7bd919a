"""From a recipe's `data` section to the two loaders a run iterates (DESIGN.md: FFCV where installed,
a torch DataLoader otherwise).

`build_pipeline(cfg, seed, rank, world_size)` -> `Pipeline`; the global `cfg.batch_size` is split
exactly over the `world_size` processes (`per_process_batch` refuses a batch that does not divide, so a
recipe trains the same global batch on any number of processes); evaluation batches are split rounding
up (they only partition the validation set). `set_epoch(loader, e)` must be called before each pass.
`cfg.loader`: `torch` reads the data set under `cfg.root`; `ffcv` reads the `.beton` files `cfg.train`
and `cfg.val` (harness/data/ffcv.py); `auto` takes ffcv when it imports and both files are given, else
torch. `Pipeline.note` says which loader it took and why; `harness launch` prints it once.
"""

import inspect
from dataclasses import dataclass
from typing import Any

from harness.data.loaders import build_loaders
from harness.data.registry import DATASETS, DataError, build_datasets


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


def build_ffcv_pipeline(cfg, seed: int, rank: int, world_size: int) -> Pipeline:
    from harness.data.ffcv import FfcvLoader, beton_labels, spec_for

    spec = spec_for(cfg.dataset, "data.dataset")
    frames = dataset_options(cfg).get("frames")
    if spec.field == "frames" and frames is None:
        raise DataError(f"{cfg.dataset} (file {cfg.train}): needs data.frames, the number of frames T per sample "
                        f"(equal to method.T)")
    common = dict(dataset=cfg.dataset, workers=cfg.workers, seed=seed, rank=rank, world_size=world_size,
                  frames=frames)
    train = FfcvLoader(cfg.train, batch_size=per_process_batch(cfg.batch_size, world_size), train=True,
                       augment=cfg.augment, **common)
    val = FfcvLoader(cfg.val, batch_size=per_process_eval_batch(cfg.eval_batch_size or cfg.batch_size, world_size),
                     train=False, augment=False, **common)
    num_classes = spec.num_classes or int(beton_labels(train.reader).max()) + 1
    size = spec.input_size
    input_shape = (frames, 2, size, size) if spec.field == "frames" else (3, size, size)
    return Pipeline(train, val, num_classes, input_shape, train.num_samples, "ffcv")


def build_pipeline(cfg, seed: int, rank: int = 0, world_size: int = 1) -> Pipeline:
    """Loaders for the recipe section `cfg` (a `harness.recipe.DataConfig`)."""
    kind, reason = choose_loader(cfg)
    if kind == "ffcv":
        pipeline = build_ffcv_pipeline(cfg, seed, rank, world_size)
    else:
        splits = build_datasets(cfg.dataset, cfg.root, augment=cfg.augment, **dataset_options(cfg))
        train, val = build_loaders(splits, per_process_batch(cfg.batch_size, world_size),
                                   per_process_eval_batch(cfg.eval_batch_size or cfg.batch_size, world_size),
                                   cfg.workers, seed, rank=rank, world_size=world_size)
        pipeline = Pipeline(train, val, splits.num_classes, tuple(splits.input_shape), len(splits.train), "torch")
    pipeline.note = f"{cfg.dataset} through the {kind} loader ({reason})"
    return pipeline
