"""From a recipe's `data` section to the two loaders a run iterates (DESIGN.md: FFCV where installed,
a torch DataLoader otherwise).

`build_pipeline(cfg, seed, rank, world_size)` -> `Pipeline`; the global `cfg.batch_size` is split
evenly over the `world_size` processes. `set_epoch(loader, e)` must be called before each pass.
"""

from dataclasses import dataclass
from typing import Any

from harness.data.loaders import build_loaders
from harness.data.registry import build_datasets


@dataclass
class Pipeline:
    train: Any  # iterable of (x, y) batches, with len()
    val: Any
    num_classes: int
    input_shape: tuple[int, ...]
    train_size: int  # samples in the training split (all processes)
    kind: str  # "torch" or "ffcv"


def per_process_batch(batch_size: int, world_size: int) -> int:
    return max(1, batch_size // world_size)


def build_pipeline(cfg, seed: int, rank: int = 0, world_size: int = 1) -> Pipeline:
    """Loaders for the recipe section `cfg` (a `harness.recipe.DataConfig`)."""
    splits = build_datasets(cfg.dataset, cfg.root, augment=cfg.augment)
    train, val = build_loaders(splits, per_process_batch(cfg.batch_size, world_size),
                               per_process_batch(cfg.eval_batch_size or cfg.batch_size, world_size),
                               cfg.workers, seed, rank=rank, world_size=world_size)
    return Pipeline(train, val, splits.num_classes, tuple(splits.input_shape), len(splits.train), "torch")
