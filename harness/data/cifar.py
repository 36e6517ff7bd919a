"""CIFAR-10 and CIFAR-100 read from the python-pickle folders of the original distribution.

Layout (either `<root>` holds the folder, or `<root>` is the folder itself):
- cifar10:  `<root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`, labels under `labels`,
  class names under `label_names`;
- cifar100: `<root>/cifar-100-python/{train, test, meta}`, the 100 fine labels under `fine_labels`,
  class names under `fine_label_names`.
Each batch file is a pickled dict (written by Python 2, so its keys load as `str` with
`encoding="latin1"`, or as `bytes` from files written by Python 3: both are accepted) holding `data`,
uint8 `[N, 3072]`, one image per row as 1,024 red, then 1,024 green, then 1,024 blue values, each plane
row-major 32x32, i.e. `[N, 3, 32, 32]` once reshaped. Files are read with an unpickler that only admits
the numpy globals such a file needs, so a hostile file cannot run code.

Transforms (DSR.md section 5; constants from the DSR reference code):
- train: RandomCrop(32, padding=4, zero fill) and RandomHorizontalFlip(p=0.5), then `x = (p/255 - mean)/std`;
- val (and train when `augment=False`): `x = (p/255 - mean)/std` only.
- cifar10:  mean (0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.2010);
- cifar100: mean (0.5071, 0.4867, 0.4408), std (0.2675, 0.2565, 0.2761).
The CIFAR-10 std is the widely used value of the reference code, not the per-channel pixel std of the
training set (0.2470, 0.2435, 0.2616); it is kept so that results compare with the paper's.
"""

import codecs
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from harness.data.registry import DataError, DataSplits, register_dataset, require_directory

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
IMAGE_SHAPE = (3, 32, 32)
PIXELS_PER_IMAGE = 3 * 32 * 32


@dataclass(frozen=True)
class PickleLayout:
    """Where one CIFAR variant keeps its files and under which keys."""

    dataset: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int
    files_summary: str

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train_files, self.test_file, self.meta_file)

    @property
    def description(self) -> str:
        return (
            f"the python-pickle layout <root>/{self.folder}/{{{self.files_summary}}} "
            f"(or those files directly in <root>)"
        )


CIFAR10_LAYOUT = PickleLayout(
    dataset="cifar10",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_file="test_batch",
    meta_file="batches.meta",
    label_key="labels",
    names_key="label_names",
    num_classes=10,
    files_summary="data_batch_1..5,test_batch,batches.meta",
)
CIFAR100_LAYOUT = PickleLayout(
    dataset="cifar100",
    folder="cifar-100-python",
    train_files=("train",),
    test_file="test",
    meta_file="meta",
    label_key="fine_labels",
    names_key="fine_label_names",
    num_classes=100,
    files_summary="train,test,meta",
)

_NDARRAY_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _NDARRAY_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NDARRAY_RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals a CIFAR batch file refers to (numpy arrays, bytes)."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR file")
        return _ALLOWED_GLOBALS[(module, name)]


class CifarImages(Dataset):
    """CIFAR images held in memory as uint8; item i is `(transform(images[i]), targets[i])`.

    Args:
        images: uint8 tensor `[N, 3, 32, 32]`.
        targets: N integer labels.
        classes: class names, index = label.
        transform: maps a uint8 `[3, 32, 32]` tensor to the normalised float32 input.
    """

    def __init__(self, images: torch.Tensor, targets: list[int], classes: list[str], transform: v2.Transform):
        self.images = images
        self.targets = targets
        self.classes = classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), self.targets[index]


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _text(value: object) -> object:
    return value.decode("latin1") if isinstance(value, bytes) else value


def locate_batches(layout: PickleLayout, root: str | None) -> Path:
    """The folder holding all of `layout`'s files: `<root>/<layout.folder>` or `<root>` itself."""
    root_path = require_directory(layout.dataset, root, layout.description)
    for folder in (root_path / layout.folder, root_path):
        if all((folder / name).is_file() for name in layout.files):
            return folder
    folder = root_path / layout.folder if (root_path / layout.folder).is_dir() else root_path
    missing = [name for name in layout.files if not (folder / name).is_file()]
    if folder == root_path and len(missing) == len(layout.files):
        what = f"{layout.folder}/"
    else:
        what = ", ".join(missing) + (f" in {folder}" if folder != root_path else "")
    raise DataError(f"{layout.dataset} root {root_path}: expected {layout.description}; missing {what}")


def read_pickle(path: Path, layout: PickleLayout) -> dict[str, object]:
    """The dict stored in one CIFAR file, keys as `str`."""
    try:
        with path.open("rb") as file:
            entry = _BatchUnpickler(file, encoding="latin1").load()
    except (
        pickle.UnpicklingError,
        EOFError,
        OSError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
    ) as error:
        raise DataError(
            f"{layout.dataset} file {path}: not a readable CIFAR pickle ({_first_line(error)}); "
            f"expected {layout.description}"
        ) from None
    if not isinstance(entry, dict):
        raise DataError(f"{layout.dataset} file {path}: holds a {type(entry).__name__}, expected a pickled dict")
    return {_text(key): value for key, value in entry.items()}


def read_batch(path: Path, layout: PickleLayout) -> tuple[np.ndarray, list[int]]:
    """`(data uint8 [N, 3, 32, 32], labels)` from one batch file, checked against the layout."""
    entry = read_pickle(path, layout)
    expected = (
        f"expected a pickled dict with 'data' uint8 [N, {PIXELS_PER_IMAGE}] and "
        f"'{layout.label_key}' (N ints in 0..{layout.num_classes - 1})"
    )
    data, labels = entry.get("data"), entry.get(layout.label_key)
    if data is None or labels is None:
        raise DataError(f"{layout.dataset} file {path}: keys {sorted(map(str, entry))}; {expected}")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2):
        kind = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{layout.dataset} file {path}: 'data' is a {kind}; {expected}")
    if data.shape[1] != PIXELS_PER_IMAGE:
        raise DataError(f"{layout.dataset} file {path}: 'data' has shape {data.shape}; {expected}")
    labels_array = np.asarray(labels)
    if labels_array.shape != (len(data),) or not np.issubdtype(labels_array.dtype, np.integer):
        raise DataError(f"{layout.dataset} file {path}: {len(data)} images but labels {labels_array.shape}; {expected}")
    if len(labels_array) and (labels_array.min() < 0 or labels_array.max() >= layout.num_classes):
        raise DataError(
            f"{layout.dataset} file {path}: labels span {labels_array.min()}..{labels_array.max()}; {expected}"
        )
    return data.reshape(-1, *IMAGE_SHAPE), labels_array.tolist()


def read_class_names(path: Path, layout: PickleLayout) -> list[str]:
    """The `num_classes` class names stored in the meta file."""
    names = read_pickle(path, layout).get(layout.names_key)
    if not isinstance(names, list) or len(names) != layout.num_classes:
        raise DataError(
            f"{layout.dataset} file {path}: expected a pickled dict with '{layout.names_key}', "
            f"a list of {layout.num_classes} class names"
        )
    return [str(_text(name)) for name in names]


def normalise(mean: tuple[float, ...], std: tuple[float, ...]) -> list[v2.Transform]:
    """uint8 `[3, H, W]` -> float32 `(p/255 - mean)/std`."""
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def _build(
    layout: PickleLayout, root: str | None, augment: bool, mean: tuple[float, ...], std: tuple[float, ...]
) -> DataSplits:
    folder = locate_batches(layout, root)
    train_batches = [read_batch(folder / name, layout) for name in layout.train_files]
    test_images, test_labels = read_batch(folder / layout.test_file, layout)
    classes = read_class_names(folder / layout.meta_file, layout)
    val_transform = v2.Compose(normalise(mean, std))
    train_transform = (
        v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(), *normalise(mean, std)])
        if augment
        else val_transform
    )
    train = CifarImages(
        torch.from_numpy(np.concatenate([images for images, _ in train_batches])),
        [label for _, labels in train_batches for label in labels],
        classes,
        train_transform,
    )
    val = CifarImages(torch.from_numpy(test_images), test_labels, classes, val_transform)
    return DataSplits(train, val, layout.num_classes, IMAGE_SHAPE, mean, std)


@register_dataset("cifar10")
def build_cifar10(root: str | None, augment: bool) -> DataSplits:
    """CIFAR-10: train 50,000, val 10,000 (the test batch), input (3, 32, 32), 10 classes."""
    return _build(CIFAR10_LAYOUT, root, augment, CIFAR10_MEAN, CIFAR10_STD)


@register_dataset("cifar100")
def build_cifar100(root: str | None, augment: bool) -> DataSplits:
    """CIFAR-100 (fine labels): train 50,000, val 10,000 (the test file), input (3, 32, 32), 100 classes."""
    return _build(CIFAR100_LAYOUT, root, augment, CIFAR100_MEAN, CIFAR100_STD)
