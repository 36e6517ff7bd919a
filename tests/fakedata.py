"""Small data sets written in the real on-disk formats, for tests (CIFAR python pickles as the
distribution's Python 2 cPickle wrote them; ImageNet-style JPEG class folders)."""

import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

NDARRAY_RECONSTRUCT = np.zeros(0).__reduce__()[0]


class Python2Pickler(pickle._Pickler):
    """Pickles `bytes` as Python 2 `str` and numpy's reconstructor under its Python 2 module name."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_python2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str

    def save_global(self, obj, name=None):
        if obj is NDARRAY_RECONSTRUCT:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def write_python2_pickle(path: Path, obj: object) -> None:
    with path.open("wb") as file:
        Python2Pickler(file, protocol=2).dump(obj)


def write_cifar_batch(
    path: Path, images: np.ndarray, labels: list[int], label_key: bytes, extra: dict | None = None
) -> None:
    """One batch file as in the distribution: `data` uint8 [N, 3072] (planes R, G, B), labels as a list."""
    entry = {
        b"batch_label": b"training batch 1 of 5",
        label_key: labels,
        b"data": images.reshape(len(images), -1),
        b"filenames": [f"image_{i}.png".encode() for i in range(len(images))],
        **(extra or {}),
    }
    write_python2_pickle(path, entry)


def write_cifar10(root: Path, per_batch: int = 4, test: int = 6, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """A `cifar-10-batches-py/` tree under `root`: 5 train batches of `per_batch` images, a test batch."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    n = 5 * per_batch + test
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).tolist()
    for batch in range(5):
        part = slice(per_batch * batch, per_batch * (batch + 1))
        write_cifar_batch(folder / f"data_batch_{batch + 1}", images[part], labels[part], b"labels")
    write_cifar_batch(folder / "test_batch", images[5 * per_batch:], labels[5 * per_batch:], b"labels")
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    write_python2_pickle(folder / "batches.meta",
                         {b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072})
    return images, labels


def write_cifar100(root: Path, train: int = 8, test: int = 4, seed: int = 1) -> tuple[np.ndarray, list[int]]:
    """A `cifar-100-python/` tree under `root` with `train` and `test` images (fine and coarse labels)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    images = rng.integers(0, 256, size=(train + test, 3, 32, 32), dtype=np.uint8)
    fine = rng.integers(0, 100, size=train + test).tolist()
    coarse = [label // 5 for label in fine]
    for name, part in (("train", slice(0, train)), ("test", slice(train, None))):
        write_cifar_batch(folder / name, images[part], fine[part], b"fine_labels", {b"coarse_labels": coarse[part]})
    meta = {
        b"fine_label_names": [f"fine_{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)],
    }
    write_python2_pickle(folder / "meta", meta)
    return images, fine


def write_jpegs(folder: Path, sizes: list[tuple[int, int]], seed: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for index, (width, height) in enumerate(sizes):
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{index}.JPEG", quality=90)
