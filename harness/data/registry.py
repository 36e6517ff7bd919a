"""The data set registry: a name maps to a builder that returns the train and validation splits.

A builder is `builder(root: str | None, augment: bool, **options) -> DataSplits`; it registers itself with
`@register_dataset(name)` (as timm's `@register_model` does) and is reached through
`build_datasets(name, root, augment)`. Every item of `DataSplits.train` and `.val` is `(x, label)`:
`x` a float32 tensor `[C, H, W]` normalised per channel, `x_c = (p_c - mean_c) / std_c` with `p_c` the
pixel scaled to [0, 1], and `label` a Python int in `0..num_classes-1`.

Anything missing or not laid out as a builder expects raises `DataError`, whose message is one line that
names the path and the expected layout.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from harness.errors import HarnessError


class DataError(HarnessError, ValueError):
    """A data set that is missing or malformed; the message is one line naming the path and the expected layout."""


@dataclass(frozen=True)
class DataSplits:
    """The two splits of a data set and what a model needs to know about its inputs.

    Args:
        train: training split, augmented when the builder was asked to augment.
        val: validation split, never augmented.
        num_classes: number of labels; labels are `0..num_classes-1`.
        input_shape: shape `(C, H, W)` of one normalised input.
        mean: per-channel mean subtracted from the [0, 1] pixels.
        std: per-channel standard deviation the centred pixels are divided by.
    """

    train: Dataset
    val: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]


DatasetBuilder = Callable[..., DataSplits]

DATASETS: dict[str, DatasetBuilder] = {}


def register_dataset(name: str) -> Callable[[DatasetBuilder], DatasetBuilder]:
    """Decorator adding a builder to `DATASETS` under `name` (each name once)."""

    def register(builder: DatasetBuilder) -> DatasetBuilder:
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is registered twice")
        DATASETS[name] = builder
        return builder

    return register


def build_datasets(dataset: str, root: str | None, augment: bool = True, **options) -> DataSplits:
    """Build the train and validation splits of the registered data set `dataset` found under `root`;
    `options` go to builders that take more (dvs_cifar10's `frames`)."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r} (root {root}); allowed: {', '.join(sorted(DATASETS))}")
    return DATASETS[dataset](root, augment, **options)


def require_directory(dataset: str, root: str | None, layout: str) -> Path:
    """`root` as a Path after checking it names an existing directory; `layout` describes what it should hold."""
    if root is None:
        raise DataError(f"{dataset} needs a root directory (root is None); expected {layout}")
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"{dataset} root {path}: does not exist; expected {layout}")
    if not path.is_dir():
        raise DataError(f"{dataset} root {path}: is a file, not a directory; expected {layout}")
    return path
