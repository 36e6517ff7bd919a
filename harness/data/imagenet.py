"""ImageNet (ILSVRC-2012) read from the standard class-folder layout.

Layout: `<root>/train/<wnid>/*.JPEG` and `<root>/val/<wnid>/*.JPEG`, the same class folders in both (the
validation images sorted into class folders, as torchvision's and timm's recipes expect). Labels are the
class folders' positions in sorted order, identical for both splits (torchvision `ImageFolder`).

Transforms (DSR.md section 5), on the decoded uint8 RGB image:
- train: RandomResizedCrop(224) (scale 0.08..1, ratio 3/4..4/3, bilinear, antialiased) and
  RandomHorizontalFlip(p=0.5), then `x = (p/255 - mean)/std`;
- val (and train when `augment=False`): Resize(256) of the shorter side, CenterCrop(224), then normalise;
- mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225): the standard ImageNet constants.
"""

from pathlib import Path

import torch
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from harness.data.registry import DataError, DataSplits, register_dataset, require_directory

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_SHAPE = (3, 224, 224)
LAYOUT = "the class-folder layout <root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG with the same classes"


def _normalised(*steps: v2.Transform) -> v2.Compose:
    """PIL image -> `steps` on uint8 -> float32 `(p/255 - mean)/std` as a plain tensor."""
    return v2.Compose(
        [
            v2.ToImage(),
            *steps,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            v2.ToPureTensor(),
        ]
    )


def _image_folder(folder: Path, transform: v2.Compose) -> ImageFolder:
    if not folder.is_dir():
        raise DataError(f"imagenet split {folder}: missing; expected {LAYOUT}")
    try:
        return ImageFolder(str(folder), transform=transform)
    except FileNotFoundError as error:
        reason = str(error).strip().splitlines()[0]
        raise DataError(f"imagenet split {folder}: {reason}; expected {LAYOUT}") from None


@register_dataset("imagenet")
def build_imagenet(root: str | None, augment: bool) -> DataSplits:
    """ImageNet from class folders: input (3, 224, 224), classes = the class folders (1,000 for ILSVRC-2012)."""
    root_path = require_directory("imagenet", root, LAYOUT)
    val_transform = _normalised(v2.Resize(256, antialias=True), v2.CenterCrop(224))
    train_transform = (
        _normalised(v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip()) if augment else val_transform
    )
    train = _image_folder(root_path / "train", train_transform)
    val = _image_folder(root_path / "val", val_transform)
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataError(
            f"imagenet root {root_path}: class folders differ between {root_path / 'train'} and "
            f"{root_path / 'val'} ({len(only_train)} only in train: {', '.join(only_train[:5]) or '-'}; "
            f"{len(only_val)} only in val: {', '.join(only_val[:5]) or '-'}); expected {LAYOUT}"
        )
    return DataSplits(train, val, len(train.classes), INPUT_SHAPE, IMAGENET_MEAN, IMAGENET_STD)
