"""The training loop: one epoch of steps, an evaluation, a checkpoint; repeat (nanoGPT-sized).

`Trainer(recipe, run_dir, ...)` builds every component from its recipe section: data loaders
(`harness.data`), the method's model and loss (`harness.methods`), the optimizer over all parameters
(thresholds, BN and biases included, one weight decay: DSR.md section 5), the per-iteration schedule
(`schedule.py`), and, when resuming, loads the checkpoint's states. `fit(tracker)` trains the remaining
epochs, evaluating every epoch (top-1, top-5 where classes > 5, firing rate of every spiking layer,
every threshold) and writing `last.pt` (and `best.pt` on a new best top-1) atomically.
The process group, if any, is the engine's business: the trainer only asks `dist` for rank and size.
"""

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from harness import data as datasets
from harness import methods
from harness.engine import checkpoint
from harness.engine.schedule import build_scheduler
from harness.recipe import Recipe, RecipeError
from harness.snn.stats import FiringRateMonitor, spiking_layers


@dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands in the job (single process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(recipe: Recipe, process: ProcessInfo, source: str) -> torch.device:
    wanted = recipe.engine.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"{source}: engine.device: 'cuda' asked for, but torch sees no CUDA device; use auto or cpu")
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", process.local_rank % max(1, torch.cuda.device_count()))
    if recipe.engine.precision == "fp16":
        raise RecipeError(f"{source}: engine.precision: fp16 needs a CUDA device; on the CPU use fp32 or bf16")
    return torch.device("cpu")


def build_optimizer(recipe: Recipe, model: nn.Module) -> torch.optim.Optimizer:
    o = recipe.optim
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)


def topk_correct(logits: torch.Tensor, target: torch.Tensor, k: int) -> int:
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return int((top == target[:, None]).any(dim=1).sum())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """Builds a run's components from its recipe and trains it.

    Args:
        recipe: the resolved recipe.
        run_dir: folder for `last.pt`, `best.pt`.
        source: the recipe file (for error messages).
        resume: a loaded checkpoint to continue from, or None.
        process: rank and world size of this process.
    """

    def __init__(self, recipe: Recipe, run_dir: Path, source: str = "recipe", resume: dict | None = None,
                 process: ProcessInfo | None = None):
        process = process or ProcessInfo()
        self.recipe, self.run_dir, self.source, self.process = recipe, Path(run_dir), source, process
        if recipe.engine.threads:
            torch.set_num_threads(recipe.engine.threads)
        seed_everything(recipe.seed)
        self.device = pick_device(recipe, process, source)
        self.data = datasets.build_pipeline(recipe.data, recipe.seed, process.rank, process.world_size)
        self.train_loader, self.val_loader = self.data.train, self.data.val
        info = methods.DataInfo(self.data.num_classes, self.data.input_shape, source)
        self.method = methods.build(recipe, info)
        self.model = self.method.model.to(self.device)
        self.num_classes = recipe.model.num_classes or self.data.num_classes
        self.optimizer = build_optimizer(recipe, self.model)
        self.iters_per_epoch = len(self.train_loader)
        if self.iters_per_epoch == 0:
            raise RecipeError(f"{source}: data.batch_size: {recipe.data.batch_size} is larger than the training "
                              f"set ({self.data.train_size} samples) and batches drop the remainder")
        self.scheduler = build_scheduler(self.optimizer, self.iters_per_epoch, recipe.optim.epochs,
                                         recipe.optim.warmup_iters, recipe.optim.schedule)
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[recipe.engine.precision]
        self.scaler = torch.amp.GradScaler("cuda", enabled=recipe.engine.precision == "fp16")
        self.epoch, self.step, self.best_acc1 = 0, 0, -1.0
        self.mlflow_run_id: str | None = None
        if resume is not None:
            self.load_state(resume)

    # ----------------------------------------------------------------------------- state
    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "step": self.step, "best_acc1": self.best_acc1,
            "rng": checkpoint.rng_state(), "recipe": self.recipe.model_dump(mode="json"),
            "mlflow_run_id": self.mlflow_run_id,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.best_acc1 = state["epoch"], state["step"], state["best_acc1"]
        self.mlflow_run_id = state.get("mlflow_run_id")
        checkpoint.set_rng_state(state["rng"])

    # ----------------------------------------------------------------------------- loop
    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def train_epoch(self, progress: Progress | None) -> dict[str, float]:
        self.model.train()
        datasets.set_epoch(self.train_loader, self.epoch)
        task = progress.add_task(f"epoch {self.epoch + 1}/{self.recipe.optim.epochs}", total=self.iters_per_epoch,
                                 speed="", loss="") if progress else None
        loss_sum, correct, seen, start = 0.0, 0, 0, time.perf_counter()
        for x, y in self.train_loader:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self.autocast():
                loss, logits = self.method.forward_loss(x, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {self.step}")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.recipe.optim.grad_clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.optim.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.step += 1
            loss_sum += loss.item() * y.shape[0]
            correct += topk_correct(logits.detach().float(), y, 1)
            seen += y.shape[0]
            if progress:
                rate = seen * self.process.world_size / (time.perf_counter() - start)
                progress.update(task, advance=1, speed=f"{rate:,.0f} img/s", loss=f"loss {loss.item():.4f}")
        elapsed = time.perf_counter() - start
        if progress:
            progress.remove_task(task)
        return {"train/loss": loss_sum / seen, "train/acc1": 100.0 * correct / seen,
                "train/img_per_s": seen * self.process.world_size / elapsed, "time/train_epoch_s": elapsed,
                "lr": self.optimizer.param_groups[0]["lr"]}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        totals = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1, top-5, samples
        with FiringRateMonitor(self.model) as monitor:
            for x, y in self.val_loader:
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                with self.autocast():
                    logits = self.model(x).float()
                totals += torch.tensor([nn.functional.cross_entropy(logits, y, reduction="sum").item(),
                                        topk_correct(logits, y, 1), topk_correct(logits, y, 5), y.shape[0]],
                                       dtype=torch.float64)
        totals = self.reduce(totals)
        n = totals[3].item()
        metrics = {"test/loss": totals[0].item() / n, "test/acc1": 100.0 * totals[1].item() / n}
        if self.num_classes > 5:
            metrics["test/acc5"] = 100.0 * totals[2].item() / n
        if self.method.extra_eval is not None:
            metrics.update(self.method.extra_eval(self))
        if self.method.spiking:
            metrics["firing_rate/mean"] = monitor.mean_rate()
            metrics.update({f"firing_rate/{name}": r for name, r in monitor.rates().items()})
            metrics.update({f"vth/{name}": float(m.vth) for name, m in spiking_layers(self.model).items()
                            if hasattr(m, "vth")})
        return metrics

    def reduce(self, totals: torch.Tensor) -> torch.Tensor:
        """Sum evaluation counts over processes (identity in a single process)."""
        return totals

    def save(self, is_best: bool) -> None:
        if not self.process.is_main:
            return
        state = self.state()
        checkpoint.save_atomic(state, self.run_dir / checkpoint.LAST)
        if is_best:
            checkpoint.save_atomic({"model": state["model"], "recipe": state["recipe"], "epoch": self.epoch,
                                    "best_acc1": self.best_acc1}, self.run_dir / checkpoint.BEST)

    def fit(self, tracker, on_epoch_end: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
        """Train from `self.epoch` to `optim.epochs`; log to `tracker`; return the summary.

        `on_epoch_end(epoch, metrics)` runs after each epoch's checkpoint (e.g. to report to Ray Tune)."""
        self.mlflow_run_id = tracker.run_id
        epochs, start, history = self.recipe.optim.epochs, time.perf_counter(), []
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[speed]}"), TextColumn("{task.fields[loss]}"), TimeElapsedColumn(),
                   TextColumn("eta"), TimeRemainingColumn()]
        with Progress(*columns, transient=True, disable=not self.process.is_main) as progress:
            while self.epoch < epochs:
                metrics = self.train_epoch(progress)
                metrics.update(self.evaluate())
                self.epoch += 1
                is_best = metrics["test/acc1"] > self.best_acc1
                self.best_acc1 = max(self.best_acc1, metrics["test/acc1"])
                metrics["test/best_acc1"] = self.best_acc1
                tracker.log_metrics(metrics, step=self.epoch)
                self.save(is_best)
                history.append(metrics)
                if self.process.is_main:
                    progress.console.print(self.epoch_line(metrics), soft_wrap=True)
                if on_epoch_end is not None:
                    on_epoch_end(self.epoch, metrics)
        final = history[-1] if history else {}
        return {
            "recipe": self.recipe.name, "epochs": self.epoch, "final_test_acc1": final.get("test/acc1", math.nan),
            "best_test_acc1": self.best_acc1, "final_test_acc5": final.get("test/acc5"),
            "firing_rate_mean": final.get("firing_rate/mean"), "wall_time_s": time.perf_counter() - start,
            "parameters": sum(p.numel() for p in self.model.parameters()), "run_dir": str(self.run_dir),
            "mlflow_run_id": tracker.run_id,
        }

    def epoch_line(self, m: dict[str, float]) -> str:
        parts = [f"epoch {self.epoch}/{self.recipe.optim.epochs}", f"loss {m['train/loss']:.4f}",
                 f"train acc {m['train/acc1']:.2f}", f"test acc1 {m['test/acc1']:.2f}"]
        if "test/acc5" in m:
            parts.append(f"acc5 {m['test/acc5']:.2f}")
        if "firing_rate/mean" in m:
            parts.append(f"rate {m['firing_rate/mean']:.3f}")
        parts.append(f"{m['train/img_per_s']:,.0f} img/s")
        return "  ".join(parts)
