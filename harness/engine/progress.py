"""What a person watching a run sees: a progress bar per epoch (img/s, loss, ETA) and one line per epoch.

The bar advances every step without reading anything from the device; the loss shown is refreshed after the
first step and then at most once a second (one host read each time), so the bar adds no synchronisation per
step.
"""

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

REFRESH_S = 1.0


def progress_bar(enabled: bool) -> Progress:
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[speed]}"), TextColumn("{task.fields[loss]}"), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn()]
    return Progress(*columns, transient=True, disable=not enabled)


class EpochBar:
    """One epoch's task on a `Progress`; `advance(loss, samples)` after each step."""

    def __init__(self, progress: Progress, description: str, total: int, world_size: int, completed: int = 0):
        self.progress, self.world_size = progress, world_size
        self.task = progress.add_task(description, total=total, completed=completed, speed="", loss="")
        self.start, self.shown = time.perf_counter(), -REFRESH_S  # the first step is shown at once
        self.samples = 0

    def advance(self, loss: torch.Tensor, samples: int) -> None:
        self.samples += samples
        now = time.perf_counter()
        fields = {}
        if now - self.shown >= REFRESH_S:
            self.shown = now
            fields = {"speed": f"{self.samples * self.world_size / (now - self.start):,.0f} img/s",
                      "loss": f"loss {loss.item():.4f}"}
        self.progress.update(self.task, advance=1, **fields)


@contextmanager
def epoch_bar(progress: Progress, description: str, total: int, world_size: int,
              completed: int = 0) -> Iterator[EpochBar]:
    bar = EpochBar(progress, description, total, world_size, completed)
    try:
        yield bar
    finally:
        progress.remove_task(bar.task)


def epoch_line(epoch: int, epochs: int, m: dict[str, float]) -> str:
    split = "val" if "val/acc1" in m else "test"
    parts = [f"epoch {epoch}/{epochs}", f"loss {m['train/loss']:.4f}", f"train acc {m['train/acc1']:.2f}",
             f"{split} acc1 {m[f'{split}/acc1']:.2f}"]
    if f"{split}/acc5" in m:
        parts.append(f"acc5 {m[f'{split}/acc5']:.2f}")
    if "firing_rate/mean" in m:
        parts.append(f"rate {m['firing_rate/mean']:.3f}")
    parts.append(f"{m['train/img_per_s']:,.0f} img/s")
    return "  ".join(parts)
