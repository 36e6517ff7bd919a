"""Loader throughput (`harness bench loader`): images per second at steady state, FFCV or torch.

`measure_loader` builds one loader for a split exactly as a run builds it (`build_loaders` or `FfcvLoader`),
draws `warmup` batches (FFCV's JIT compilation, worker start-up, page cache), then times the next
`batches` batches, passing over the split again as often as needed:
`images_per_s = samples in the timed batches / their wall time`. The loader only decodes and augments;
nothing consumes the batches.
"""

import json
import platform
import time
from pathlib import Path

import torch

from harness.data.loaders import build_loaders, set_epoch
from harness.data.registry import DataError, build_datasets


def open_loader(dataset: str, loader: str, split: str, root: str | None, beton: str | None, batch_size: int,
                workers: int, augment: bool, frames: int | None):
    """The loader of one split, as `build_pipeline` would make it."""
    train = split == "train"
    options = {"frames": frames} if frames is not None else {}
    if loader == "ffcv":
        if beton is None:
            raise DataError("bench loader: --loader ffcv needs --beton FILE (write it with harness data write-ffcv)")
        from harness.data.ffcv import FfcvLoader

        return FfcvLoader(beton, dataset, batch_size, workers, seed=0, train=train, augment=augment, **options)
    splits = build_datasets(dataset, root, augment=augment, **options)
    train_loader, val_loader = build_loaders(splits, batch_size, batch_size, workers, seed=0)
    return train_loader if train else val_loader


def measure_loader(data_loader, warmup: int, batches: int) -> dict[str, float]:
    """Draw `warmup` then time `batches` batches; return samples, seconds and images/s of the timed part."""
    if len(data_loader) == 0:
        raise DataError("bench loader: the split holds less than one batch; use a smaller --batch-size")
    epoch, drawn, samples, start, shapes = 0, 0, 0, None, None
    while drawn < warmup + batches:
        set_epoch(data_loader, epoch)
        for x, y in data_loader:
            if drawn == warmup:
                start = time.perf_counter()
            if drawn >= warmup:
                samples += y.shape[0]
            shapes = (tuple(x.shape), str(x.dtype), tuple(y.shape), str(y.dtype))
            drawn += 1
            if drawn == warmup + batches:
                break
        epoch += 1
    seconds = time.perf_counter() - start
    return {"samples": samples, "seconds": seconds, "images_per_s": samples / seconds, "batch_x_shape": shapes[0],
            "x_dtype": shapes[1], "y_shape": shapes[2], "y_dtype": shapes[3]}


def write_result(result: dict, out_dir: str | Path) -> Path:
    """Save `result` (plus the machine) as JSON under `out_dir`; return the path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {**result, "machine": platform.machine(), "processor": platform.processor(),
              "torch_threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"loader-{result['dataset']}-{result['loader']}-{result['split']}-{stamp}.json"
    path.write_text(json.dumps(result, indent=2))
    return path
