"""DVS-CIFAR10 (Li et al. 2017) as DSR uses it (DSR.md sections 4-5): event recordings -> T frames.

Layout: `<root>/<class>/*.aedat` (the original release: jAER AEDAT 2.0, big-endian 32-bit address and
32-bit timestamp per event, DVS128 addresses) or `<root>/<class>/*.aedat4` (the AEDAT 4 re-release that
tonic's `CIFAR10DVS` downloads), with the 10 class folders `airplane .. truck`; label = the class's
position in `CLASSES`. Within a class the files are ordered by the sample number their name ends with
(`cifar10_airplane_17.aedat` -> 17); the first 9/10 train and the rest test, i.e. samples 0-899 and
900-999 of the full 1,000 per class.

Events are read with tonic (`tonic.io`); AEDAT 2.0 addresses decode as SpikingJelly decodes them
(`x = 127 - ((a >> 1) & 127)`, `y = (a >> 8) & 127`, `p = 1 - (a & 1)`). A sample becomes frames by
tonic's `ToFrame(n_event_bins=T)`: the events split into T slices of equal event count, each slice
counted per pixel and polarity -> int `[T, 2, 128, 128]`, then resized to 48x48 (bilinear, antialiased) ->
float32 `[T, 2, 48, 48]`, no normalisation (values are event counts). Training adds RandomCrop(48,
padding=4), one offset per sample shared by all its frames. The T of the frames is the recipe's
`data.frames`, which must equal the method's T (harness/recipe.py).
"""

import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from harness.data.registry import DataError, DataSplits, register_dataset, require_directory

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SENSOR_SIZE = (128, 128, 2)  # tonic's (W, H, polarities)
FRAME_SIZE = 48
CROP_PADDING = 4
TRAIN_FRACTION = 0.9
EVENT_SUFFIXES = (".aedat", ".aedat4")
LAYOUT = "class folders <root>/{airplane,automobile,...,truck}/*.aedat (or *.aedat4)"
MEAN = (0.0, 0.0)
STD = (1.0, 1.0)


def read_events(path: Path) -> np.ndarray:
    """The events of one recording as tonic's structured array (x, y, t, p)."""
    import tonic.io

    try:
        if path.suffix == ".aedat4":
            raw = tonic.io.read_aedat4(str(path))
            x, y, t, p = raw["x"], raw["y"], raw["t"], raw["on"] if "on" in raw.dtype.names else raw["p"]
        else:
            version, start, _ = tonic.io.read_aedat_header_from_file(str(path))
            raw = tonic.io.get_aer_events_from_file(str(path), version, start)
            address = raw["address"].astype(np.int64)
            x = 127 - ((address >> 1) & 0x7F)
            y = (address >> 8) & 0x7F
            p = 1 - (address & 1)
            t = raw["timeStamp"]
    except Exception as error:  # tonic's readers fail with assorted errors on bad files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"dvs_cifar10 file {path}: not a readable event file ({reason}); expected {LAYOUT}") from None
    if len(x) == 0:
        raise DataError(f"dvs_cifar10 file {path}: holds no events")
    return tonic.io.make_structured_array(x, y, t, p)


def events_to_frames(events: np.ndarray, frames: int) -> torch.Tensor:
    """float32 `[frames, 2, 48, 48]`: equal-count event slices, counted per pixel, resized to 48x48."""
    import tonic.transforms

    counts = tonic.transforms.ToFrame(sensor_size=SENSOR_SIZE, n_event_bins=frames)(events)
    full = torch.from_numpy(counts.astype(np.float32))
    return v2.functional.resize(full, [FRAME_SIZE, FRAME_SIZE], antialias=True)


class DvsFrames(Dataset):
    """DVS recordings binned into frames on the fly; item i is `(transform(frames_i), label_i)`.

    Args:
        files: event files, one per sample.
        targets: the label of each file.
        frames: T, frames per sample.
        transform: applied to float32 `[T, 2, 48, 48]` (the same spatial crop for all T frames).
    """

    def __init__(self, files: list[Path], targets: list[int], frames: int, transform: v2.Transform | None):
        self.files = files
        self.targets = targets
        self.frames = frames
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def frames_of(self, index: int) -> torch.Tensor:
        """The un-augmented frames of sample `index`."""
        return events_to_frames(read_events(self.files[index]), self.frames)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.frames_of(index)
        return (self.transform(x) if self.transform is not None else x), self.targets[index]


def sample_number(path: Path) -> int:
    match = re.search(r"(\d+)$", path.stem)
    if match is None:
        raise DataError(f"dvs_cifar10 file {path}: name does not end with a sample number (e.g. cifar10_cat_17.aedat)")
    return int(match.group(1))


def class_files(root: Path) -> list[list[Path]]:
    """Per class (in `CLASSES` order) its event files ordered by sample number."""
    missing = [name for name in CLASSES if not (root / name).is_dir()]
    if missing:
        raise DataError(f"dvs_cifar10 root {root}: missing class folders {', '.join(missing)}; expected {LAYOUT}")
    per_class = []
    for name in CLASSES:
        files = [f for f in (root / name).iterdir() if f.is_file() and f.suffix in EVENT_SUFFIXES]
        if not files:
            raise DataError(f"dvs_cifar10 folder {root / name}: no .aedat or .aedat4 files; expected {LAYOUT}")
        per_class.append(sorted(files, key=sample_number))
    return per_class


def split_files(per_class: list[list[Path]]) -> tuple[list[Path], list[int], list[Path], list[int]]:
    """Per class the first 9/10 of its samples train, the rest test: `(train files, labels, test files, labels)`."""
    train, train_labels, test, test_labels = [], [], [], []
    for label, files in enumerate(per_class):
        cut = round(len(files) * TRAIN_FRACTION)
        train += files[:cut]
        train_labels += [label] * cut
        test += files[cut:]
        test_labels += [label] * (len(files) - cut)
    return train, train_labels, test, test_labels


@register_dataset("dvs_cifar10")
def build_dvs_cifar10(root: str | None, augment: bool, frames: int | None = None) -> DataSplits:
    """DVS-CIFAR10: train 9,000, test 1,000 samples of float32 `[frames, 2, 48, 48]`, 10 classes."""
    if frames is None:
        raise DataError(f"dvs_cifar10 (root {root}): needs data.frames, the number of frames T per sample "
                        f"(equal to method.T)")
    root_path = require_directory("dvs_cifar10", root, LAYOUT)
    train_files, train_labels, test_files, test_labels = split_files(class_files(root_path))
    crop = v2.RandomCrop(FRAME_SIZE, padding=CROP_PADDING) if augment else None
    train = DvsFrames(train_files, train_labels, frames, crop)
    val = DvsFrames(test_files, test_labels, frames, None)
    return DataSplits(train, val, len(CLASSES), (frames, 2, FRAME_SIZE, FRAME_SIZE), MEAN, STD)
