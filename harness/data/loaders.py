"""Torch DataLoaders whose epoch e is a pure function of (seed, rank, e), on one process or many.

Train order:
- one process: a RandomSampler drawing from the loader's torch.Generator;
- `world_size > 1`: DistributedSampler(shuffle=True, seed=seed, drop_last=drop_last), whose permutation of
  epoch e is seeded by `seed + e` and is the same on every rank, each rank taking its own stride.
Augmentation randomness with `workers > 0`: DataLoader seeds worker w's torch RNG with `base + w`, `base`
drawn from the loader's generator when the epoch's iterator is created; `seed_worker` seeds numpy and
`random` from it. `set_epoch(loader, e)` reseeds that generator from (seed, e, rank) (and sets the
DistributedSampler's epoch), so epoch e's order and worker seeds do not depend on the epochs before it:
a run resumed at epoch e sees the batches an uninterrupted run sees. Workers are therefore not persistent
(persistent workers keep their RNG streams from epoch to epoch, which a resumed run cannot reproduce);
the cost is one worker start per epoch. With `workers == 0`, augmentation draws from the process's
global torch RNG, which the trainer's checkpoint saves and restores.

Validation: never shuffled, no dropped or padded samples; under `world_size > 1` rank r evaluates the
indices r, r + w, r + 2w, ... (`ShardSampler`), so every sample counts exactly once over all ranks and
shard sizes differ by at most one: sum correct counts and sample counts across ranks, do not average
per-rank accuracies.
"""

import random
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from harness.data.registry import DataSplits


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A 64-bit seed that is a pure, well-mixed function of (seed, epoch, rank) (numpy SeedSequence)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, dtype=np.uint64)[0])


def seed_worker(worker_id: int) -> None:
    """Seed numpy and `random` in a loader worker from the torch seed DataLoader gave it."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


class ShardSampler(Sampler[int]):
    """Indices `rank, rank + world_size, ...` of `range(num_samples)`: shards partition the set, no padding.

    Args:
        num_samples: size of the data set.
        rank: this process's rank, `0 <= rank < world_size`.
        world_size: number of processes.
    """

    def __init__(self, num_samples: int, rank: int, world_size: int):
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))


class SeededDataLoader(DataLoader):
    """A DataLoader whose randomness at epoch e comes from `epoch_seed(seed, e, rank)` alone.

    Args:
        dataset: the map-style data set.
        seed: the run's seed.
        rank: this process's rank (mixed into the worker seeds so ranks augment independently).
        **loader_args: passed to DataLoader (not `generator`, which this class owns).
    """

    def __init__(self, dataset: Dataset, *, seed: int, rank: int, **loader_args):
        super().__init__(dataset, generator=torch.Generator(), **loader_args)
        self.seed = seed
        self.rank = rank
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass over the loader epoch `epoch`'s: its order and worker seeds."""
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)
        self.generator.manual_seed(epoch_seed(self.seed, epoch, self.rank))


def build_loaders(
    splits: DataSplits,
    batch_size: int,
    eval_batch_size: int,
    workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = True,
) -> tuple[SeededDataLoader, SeededDataLoader]:
    """`(train_loader, val_loader)` over `splits` for process `rank` of `world_size`.

    Args:
        splits: the data sets (`build_datasets`).
        batch_size: training batch size per process.
        eval_batch_size: validation batch size per process.
        workers: loader worker processes per loader (0: load in the main process).
        seed: the run's seed; fixes every epoch's order and augmentation seeds (call `set_epoch`).
        rank: this process's rank, `0 <= rank < world_size`.
        world_size: number of processes sharing the data.
        drop_last: drop the last incomplete training batch (and, when distributed, the tail of samples that
            does not divide evenly across ranks instead of padding with repeats).
    """
    if batch_size < 1 or eval_batch_size < 1 or workers < 0:
        raise ValueError(f"batch sizes must be >= 1 and workers >= 0, got {batch_size}, {eval_batch_size}, {workers}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..world_size-1, got rank {rank} of world_size {world_size}")
    common = dict(
        num_workers=workers,
        worker_init_fn=seed_worker,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        seed=seed,
        rank=rank,
    )
    if world_size > 1:
        train_sampler = DistributedSampler(
            splits.train, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=drop_last
        )
        train = SeededDataLoader(
            splits.train, batch_size=batch_size, sampler=train_sampler, drop_last=drop_last, **common
        )
        val_sampler = ShardSampler(len(splits.val), rank, world_size)
        val = SeededDataLoader(splits.val, batch_size=eval_batch_size, sampler=val_sampler, **common)
    else:
        train = SeededDataLoader(splits.train, batch_size=batch_size, shuffle=True, drop_last=drop_last, **common)
        val = SeededDataLoader(splits.val, batch_size=eval_batch_size, shuffle=False, **common)
    return train, val


@runtime_checkable
class EpochLoader(Protocol):
    """A loader whose pass e is epoch e's: `SeededDataLoader`, or `harness.data.ffcv.FfcvLoader`."""

    def set_epoch(self, epoch: int) -> None: ...


def set_epoch(loader: EpochLoader, epoch: int) -> None:
    """Put a loader from `build_loaders` or `build_pipeline` at epoch `epoch` (call before each pass, train and
    resume alike)."""
    if not isinstance(loader, EpochLoader):
        raise TypeError(f"set_epoch needs a loader from build_loaders or build_pipeline, got {type(loader).__name__}")
    loader.set_epoch(epoch)
