"""FFCV `.beton` files: written from the data set readers, read back as the trainer's loaders.

Writing (`write_beton`): the split is read by the same builder `harness.data.build_datasets` uses (CIFAR
pickles, ImageNet class folders, DVS event files), un-augmented, and stored as fields `image`
(RGBImageField: CIFAR raw uint8, ImageNet JPEG by default) or `frames` (NDArrayField float32
`[T, 2, 48, 48]`, DVS), and `label` (IntField). The file is written under a temporary name in the target
folder and renamed when complete, so an interrupted write never leaves a `.beton` that looks whole.

Reading (`FfcvLoader`): one FFCV Loader per split for the whole run (each new Loader JIT-compiles for
seconds). Pipelines reproduce the torch readers' transforms (DSR.md section 5):
- CIFAR train: RandomTranslate(padding 4, zero fill) = RandomCrop(32, padding=4), RandomHorizontalFlip;
- ImageNet train: RandomResizedCrop 224 (scale 0.08-1, ratio 3/4-4/3) and flip; val: the centred square of
  side 224/256 of the shorter side, resized to 224 (= Resize(256) then CenterCrop(224));
- DVS train: one random crop with padding 4 per sample, shared by its T frames (`RandomFrameCrop`).
Images are then normalised to exactly the torch readers' values, `x = (p/255 - mean)/std` with the
constants of cifar.py and imagenet.py (float32 `[B, C, H, W]`); labels are int64 `[B]`. Where:
- on the CPU (`device` None or cpu): in the FFCV threads (`NormaliseToCHW`, a table of the 256 values);
- for a CUDA `device`: the uint8 `[B, H, W, C]` batch goes to the GPU as it is (a quarter of float32's
  bytes; FFCV's `ToDevice`, non-blocking from FFCV's pinned buffers, so the copy overlaps the step) and is
  normalised there by the same torchvision calls (`normalise_on_device`), into channels-last layout;
  DVS frames and labels are moved the same way. The values are the same bit for bit (`normalise_on_device`
  on the CPU equals the table, tests/test_ffcv.py).

Order: epoch e's training order is the permutation of all samples drawn from `epoch_seed(seed, e)`,
identical on every rank; under `world_size > 1` the tail that does not divide evenly is dropped and rank
r takes positions r, r + w, ... (each sample at most once per epoch over all ranks, as the torch
DistributedSampler(drop_last=True)). Validation is in file order, rank r taking samples r, r + w, ...
(every sample exactly once, no padding). `set_epoch(e)` selects epoch e's order, so a resumed run sees
the same order; FFCV's augmentation draws from numba's own RNG and is not reproduced on resume. FFCV's
built-in distributed order is not used: it pads shards with repeated samples (DistributedSampler with
drop_last=False), which double-counts validation samples.
"""

import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from ffcv.fields import IntField, NDArrayField, RGBImageField
from ffcv.fields.basics import IntDecoder
from ffcv.fields.decoders import (
    CenterCropRGBImageDecoder,
    NDArrayDecoder,
    RandomResizedCropRGBImageDecoder,
    SimpleRGBImageDecoder,
)
from ffcv.loader import Loader, OrderOption
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.reader import Reader
from ffcv.transforms import RandomHorizontalFlip, RandomTranslate, ToDevice, ToTensor
from ffcv.traversal_order.base import TraversalOrder
from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, HeaderType
from ffcv.writer import DatasetWriter
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from harness.data import dvs
from harness.data.cifar import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, CifarImages
from harness.data.imagenet import IMAGENET_MEAN, IMAGENET_STD
from harness.data.loaders import epoch_seed
from harness.data.registry import DataError, build_datasets

IMAGENET_SIZE = 224
IMAGENET_RESIZE = 256


@dataclass(frozen=True)
class BetonSpec:
    """What a data set's `.beton` holds and how its samples are shaped and normalised.

    Args:
        dataset: registered data set name.
        field: `image` (RGBImageField) or `frames` (NDArrayField float32).
        stored_size: the side every stored image has (CIFAR 32), None when sizes vary (ImageNet).
        input_size: the side of the images (frames) the loader yields.
        num_classes: number of labels, None to take max label + 1 of the training file (ImageNet).
        mean: per-channel mean (images only).
        std: per-channel standard deviation (images only).
        write_mode: FFCV's default `write_mode` for the image field.
    """

    dataset: str
    field: str
    stored_size: int | None
    input_size: int
    num_classes: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    write_mode: str = "raw"


SPECS = {
    "cifar10": BetonSpec("cifar10", "image", 32, 32, 10, CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": BetonSpec("cifar100", "image", 32, 32, 100, CIFAR100_MEAN, CIFAR100_STD),
    "imagenet": BetonSpec("imagenet", "image", None, IMAGENET_SIZE, None, IMAGENET_MEAN, IMAGENET_STD,
                          write_mode="jpg"),
    "dvs_cifar10": BetonSpec("dvs_cifar10", "frames", dvs.FRAME_SIZE, dvs.FRAME_SIZE, len(dvs.CLASSES),
                             dvs.MEAN, dvs.STD),
}


def spec_for(dataset: str, source: str = "") -> BetonSpec:
    if dataset not in SPECS:
        where = f"{source}: " if source else ""
        raise DataError(f"{where}unknown dataset {dataset!r} for FFCV; allowed: {', '.join(SPECS)}")
    return SPECS[dataset]


# ----------------------------------------------------------------------------------------------- writing


class BetonRecords(Dataset):
    """The samples of one split as FFCV's writer takes them: `(HWC uint8 image or float32 frames, label)`."""

    def __init__(self, split: Dataset):
        if not isinstance(split, CifarImages | ImageFolder | dvs.DvsFrames):
            raise TypeError(f"no FFCV record layout for {type(split).__name__}")
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[object, int]:
        split = self.split
        if isinstance(split, CifarImages):
            return split.images[index].permute(1, 2, 0).contiguous().numpy(), int(split.targets[index])
        if isinstance(split, ImageFolder):
            path, label = split.samples[index]
            return split.loader(path), int(label)
        return split.frames_of(index).numpy(), int(split.targets[index])


def write_beton(dataset: str, root: str, split: str, out: str | Path, *, max_resolution: int | None = None,
                jpeg_quality: int = 90, write_mode: str | None = None, workers: int = 1,
                frames: int = 20) -> int:
    """Write split `split` (train|val) of `dataset` under `root` to the FFCV file `out`; return its sample count.

    `max_resolution`, `jpeg_quality` and `write_mode` (default: raw for CIFAR, jpg for ImageNet) go to
    FFCV's RGBImageField; `frames` is the T of DVS samples; `workers` are FFCV's writer processes."""
    spec = spec_for(dataset)
    if split not in ("train", "val"):
        raise DataError(f"split {split!r}: allowed: train, val")
    options = {"frames": frames} if spec.field == "frames" else {}
    splits = build_datasets(dataset, root, augment=False, **options)
    records = BetonRecords(splits.train if split == "train" else splits.val)
    if spec.field == "frames":
        fields = {"frames": NDArrayField(np.dtype("float32"), (frames, 2, dvs.FRAME_SIZE, dvs.FRAME_SIZE))}
    else:
        fields = {"image": RGBImageField(write_mode=write_mode or spec.write_mode, max_resolution=max_resolution,
                                         jpeg_quality=jpeg_quality)}
    fields["label"] = IntField()
    out = Path(out)
    if not out.parent.is_dir():
        raise DataError(f"ffcv output {out}: folder {out.parent} does not exist")
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        DatasetWriter(str(partial), fields, num_workers=max(1, workers)).from_indexed_dataset(
            records, chunksize=max(1, min(100, len(records) // max(1, workers) or 1)))
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return len(records)


# ----------------------------------------------------------------------------------------------- reading


def open_beton(path: str | Path, spec: BetonSpec, frames: int | None = None) -> Reader:
    """FFCV's Reader of `path` after checking the file is whole and holds `spec`'s fields and shapes."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"ffcv file {path}: does not exist")
    size = path.stat().st_size
    header = np.fromfile(path, dtype=HeaderType, count=1)
    if len(header) == 1 and header[0]["version"] == CURRENT_VERSION and header[0]["alloc_table_ptr"] > size:
        raise DataError(f"ffcv file {path}: truncated ({size} bytes, but its table starts at byte "
                        f"{header[0]['alloc_table_ptr']}); write it again with harness data write-ffcv")
    try:
        reader = Reader(str(path))
    except Exception as error:  # FFCV raises assorted errors (AssertionError, ValueError, IndexError) on bad files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"ffcv file {path}: not a readable .beton ({reason})") from None
    table_at = int(reader.header["alloc_table_ptr"])
    table = reader.alloc_table
    ends = table["ptr"].astype(np.int64) + table["size"].astype(np.int64) if len(table) else np.zeros(1, np.int64)
    if (table_at > size or (size - table_at) % ALLOC_TABLE_TYPE.itemsize or ends.max() > table_at
            or len(np.unique(table["sample_id"])) != reader.num_samples):
        raise DataError(f"ffcv file {path}: truncated or incomplete ({size} bytes; its table of "
                        f"{reader.num_samples} samples does not fit); write it again with harness data write-ffcv")
    expected = {spec.field: NDArrayField if spec.field == "frames" else RGBImageField, "label": IntField}
    found = {name: type(handler) for name, handler in reader.handlers.items()}
    if found != expected:
        describe = ", ".join(f"{name}: {kind.__name__}" for name, kind in found.items())
        wanted = ", ".join(f"{name}: {kind.__name__}" for name, kind in expected.items())
        raise DataError(f"ffcv file {path}: holds fields ({describe}); a {spec.dataset} .beton holds ({wanted})")
    columns = {name: f"f{i}" for i, name in enumerate(reader.field_names)}
    if spec.field == "image" and spec.stored_size is not None:
        heights, widths = (reader.metadata[columns["image"]][key] for key in ("height", "width"))
        if len(heights) and (heights.min() != spec.stored_size or heights.max() != spec.stored_size
                             or widths.min() != spec.stored_size or widths.max() != spec.stored_size):
            raise DataError(f"ffcv file {path}: images of {widths.min()}-{widths.max()} x {heights.min()}-"
                            f"{heights.max()} pixels; {spec.dataset} images are {spec.stored_size}x{spec.stored_size}")
    if spec.field == "frames":
        handler = reader.handlers["frames"]
        shape = (frames, 2, spec.stored_size, spec.stored_size)
        stored = tuple(int(side) for side in handler.shape)
        if stored != shape or handler.dtype != np.float32:
            raise DataError(f"ffcv file {path}: frames {handler.dtype} {stored}; data.frames {frames} "
                            f"needs float32 {shape} (write it with --frames {frames})")
    labels = reader.metadata[columns["label"]]
    if spec.num_classes is not None and len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise DataError(f"ffcv file {path}: labels span {labels.min()}..{labels.max()}; "
                        f"{spec.dataset} has labels 0..{spec.num_classes - 1}")
    return reader


def beton_labels(reader: Reader) -> np.ndarray:
    return reader.metadata[f"f{reader.field_names.index('label')}"]


class ShardOrder(TraversalOrder):
    """Epoch e: all samples (shuffled by `epoch_seed(seed, e)`, same on every rank), cut to a multiple of
    `world_size` when `drop_tail`, then positions `rank, rank + world_size, ...`."""

    def __init__(self, loader: Loader, *, shuffle: bool, seed: int, rank: int, world_size: int, drop_tail: bool):
        super().__init__(loader)
        self.shuffle, self.run_seed, self.rank, self.world_size, self.drop_tail = (
            shuffle, seed, rank, world_size, drop_tail)

    def sample_order(self, epoch: int) -> np.ndarray:
        order = self.indices
        if self.shuffle:
            order = np.random.default_rng(epoch_seed(self.run_seed, epoch)).permutation(order)
        if self.drop_tail:
            order = order[:len(order) - len(order) % self.world_size]
        return order[self.rank::self.world_size]


class RandomFrameCrop(Operation):
    """RandomCrop(H, padding) with zero fill on `[T, C, H, W]` samples, one offset per sample for all frames."""

    def __init__(self, padding: int):
        super().__init__()
        self.padding = padding

    def generate_code(self):
        my_range = Compiler.get_iterator()
        pad = self.padding

        def crop(frames, padded):
            n, _, _, h, w = frames.shape
            padded[:] = 0
            padded[:, :, :, pad:pad + h, pad:pad + w] = frames
            for i in my_range(n):
                top = np.random.randint(0, 2 * pad + 1)
                left = np.random.randint(0, 2 * pad + 1)
                frames[i] = padded[i, :, :, top:top + h, left:left + w]
            return frames

        crop.is_parallel = True
        return crop

    def declare_state_and_memory(self, previous_state):
        t, c, h, w = previous_state.shape
        padded = AllocationQuery((t, c, h + 2 * self.padding, w + 2 * self.padding), previous_state.dtype)
        return replace(previous_state, jit_mode=True), padded


class NormaliseToCHW(Operation):
    """uint8 `[H, W, C]` images -> float32 `[C, H, W]` through a table `table[p, c]` holding the torch readers'
    `(p/255 - mean_c)/std_c` computed by the same torchvision calls, so the values match them bit for bit."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        pixels = torch.arange(256, dtype=torch.uint8).expand(len(mean), 256).reshape(len(mean), 256, 1)
        values = v2.functional.normalize(v2.functional.to_dtype(pixels, torch.float32, scale=True), list(mean),
                                         list(std))
        self.table = values.reshape(len(mean), 256).T.contiguous().numpy()

    def generate_code(self):
        my_range = Compiler.get_iterator()
        table = self.table

        def normalise(images, out):
            n, h, w, c = images.shape
            for i in my_range(n):
                for row in range(h):
                    for col in range(w):
                        for channel in range(c):
                            out[i, channel, row, col] = table[images[i, row, col, channel], channel]
            return out

        normalise.is_parallel = True
        return normalise

    def declare_state_and_memory(self, previous_state):
        h, w, c = previous_state.shape
        float32 = np.dtype("float32")
        return (replace(previous_state, jit_mode=True, shape=(c, h, w), dtype=float32),
                AllocationQuery((c, h, w), float32))


def normalise_on_device(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 `[B, H, W, C]` -> float32 `[B, C, H, W]` (channels-last in memory) on the images' device, by the
    torchvision calls `NormaliseToCHW`'s table holds: the same values bit for bit."""
    chw = images.permute(0, 3, 1, 2)
    return v2.functional.normalize(v2.functional.to_dtype(chw, torch.float32, scale=True), list(mean), list(std))


def field_pipeline(spec: BetonSpec, train: bool, augment: bool, device: torch.device | None = None,
                   normalise: bool = True) -> list[Operation]:
    """FFCV operations from stored bytes to normalised float32 `[C, H, W]` images or `[T, 2, H, W]` frames, moved
    to `device` if it is a CUDA device. Images stay uint8 `[H, W, C]` (normalised after batching,
    `normalise_on_device`) where `normalise` is False, which a CUDA `device` implies."""
    augmented = train and augment
    to_device = [ToDevice(device, non_blocking=True)] if device is not None and device.type == "cuda" else []
    if spec.field == "frames":
        return [NDArrayDecoder(), *([RandomFrameCrop(dvs.CROP_PADDING)] if augmented else []), ToTensor(),
                *to_device]
    if spec.dataset == "imagenet" and augmented:
        steps = [RandomResizedCropRGBImageDecoder((IMAGENET_SIZE, IMAGENET_SIZE)), RandomHorizontalFlip()]
    elif spec.dataset == "imagenet":
        steps = [CenterCropRGBImageDecoder((IMAGENET_SIZE, IMAGENET_SIZE), ratio=IMAGENET_SIZE / IMAGENET_RESIZE)]
    elif augmented:
        steps = [SimpleRGBImageDecoder(), RandomTranslate(padding=4), RandomHorizontalFlip()]
    else:
        steps = [SimpleRGBImageDecoder()]
    in_threads = [NormaliseToCHW(spec.mean, spec.std)] if normalise and not to_device else []
    return [*steps, *in_threads, ToTensor(), *to_device]


class FfcvLoader:
    """One FFCV Loader over a `.beton` split, yielding `(x, y)` as the torch loaders do.

    Args:
        path: the `.beton` file.
        dataset: registered data set name (`SPECS`).
        batch_size: batch size of this process.
        workers: FFCV's decoding threads (at least 1).
        seed: the run's seed (order of epoch e: `epoch_seed(seed, e)`).
        rank: this process's rank.
        world_size: number of processes.
        train: training split (shuffled, tail dropped, last incomplete batch dropped) or validation.
        augment: apply the training augmentations (training split only).
        frames: T of DVS samples (checked against the file).
        device: where the batches go (module docstring): a CUDA device moves uint8 images there and normalises
            them there; None or the CPU normalises in FFCV's threads.
        normalise_after_batching: normalise images with `normalise_on_device` after FFCV (wherever the batch
            is), not in its threads; implied by a CUDA `device` (on the CPU: to test that path).
    """

    def __init__(self, path: str | Path, dataset: str, batch_size: int, workers: int, seed: int, rank: int = 0,
                 world_size: int = 1, train: bool = True, augment: bool = True, frames: int | None = None,
                 device: torch.device | None = None, normalise_after_batching: bool = False):
        self.spec = spec_for(dataset)
        self.path = Path(path)
        self.reader = open_beton(self.path, self.spec, frames)
        self.num_samples = int(self.reader.num_samples)
        on_gpu = device is not None and device.type == "cuda"
        self.normalise_after = self.spec.field == "image" and (on_gpu or normalise_after_batching)
        label = [IntDecoder(), ToTensor(), *([ToDevice(device, non_blocking=True)] if on_gpu else [])]
        self.loader = Loader(str(self.path), batch_size=batch_size, num_workers=max(1, workers),
                             order=OrderOption.SEQUENTIAL, drop_last=train,
                             pipelines={self.spec.field: field_pipeline(self.spec, train, augment, device,
                                                                        normalise=not self.normalise_after),
                                        "label": label})
        # Loader(order=<TraversalOrder>) is broken in ffcv 1.0.2 (it tests isinstance on a class): set it here.
        self.loader.traversal_order = ShardOrder(self.loader, shuffle=train, seed=seed, rank=rank,
                                                 world_size=world_size, drop_tail=train)
        self.loader.first_traversal_order = self.loader.next_traversal_order()

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass over the loader epoch `epoch`'s order."""
        self.loader.next_epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:  # FFCV reuses its batch buffers: hand out copies (normalising makes one)
            x = normalise_on_device(x, self.spec.mean, self.spec.std) if self.normalise_after else x.clone()
            yield x, y.reshape(-1).to(torch.int64, copy=True)
