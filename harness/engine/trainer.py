"""The training loop: one epoch of steps, an evaluation, a checkpoint; repeat (nanoGPT-sized).

`Trainer(recipe, run_dir, ...)` builds every component from its recipe section: data loaders
(`harness.data`), the method's model and loss (`harness.methods`), the optimizer over all parameters
(thresholds, BN and biases included, one weight decay: DSR.md section 5), the per-iteration schedule
(`schedule.py`), and, when resuming, loads the checkpoint's states. `fit(tracker)` trains the remaining
epochs, evaluating every epoch (top-1, top-5 where classes > 5, firing rate of every spiking layer,
every threshold) and writing `last.pt` (and `best.pt` on a new best top-1) atomically.

Engines (`engine.kind`), applied by `parallelize()` at the start of `fit` (after the method's `prepare`) to
`MethodStep`, the method's training forward as a module, never inside model code (torchtitan style):
  single     the plain module; also `ddp` when there is one process;
  ddp        DistributedDataParallel over the job's processes (`distributed.py`; why DSR's threshold
             gradient needs no rescaling is derived there); `engine.sync_bn` converts batch norm to
             global-batch statistics (`sync_bn.py`) before the model moves to its device;
  deepspeed  a DeepSpeed engine (`deepspeed_engine.py`).
`data.batch_size` is the global batch of one optimizer step: each of N processes loads B/N samples and
runs them as `engine.grad_accum` equal micro-batches (loss / grad_accum each; DDP synchronises the last
only), so the step's gradient is that of the mean loss over B whatever N and grad_accum (batch norm
statistics excepted: they are per micro-batch, over all processes with sync_bn).
Rank 0 alone logs and writes `last.pt`/`best.pt` (under DeepSpeed every rank also writes its checkpoint
part); every rank loads them on resume, with any number of processes (DeepSpeed ZeRO: the same number).
Evaluation runs the plain model on each rank's shard of the validation set and sums the counts
(`reduce`); train metrics are summed the same way. In a distributed run every rank reseeds its global
RNG (dropout) at each epoch from (seed, epoch, rank), and BN running statistics are rank 0's after each
epoch (broadcast), as DDP keeps them.
"""

import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from harness import data as datasets
from harness import methods
from harness.engine import checkpoint, deepspeed_engine, distributed
from harness.engine.distributed import ProcessInfo
from harness.engine.schedule import build_scheduler
from harness.engine.sync_bn import convert_to_global_batchnorm
from harness.recipe import Recipe, RecipeError
from harness.snn.stats import FiringRateMonitor, spiking_layers


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


class MethodStep(nn.Module):
    """The method's training forward, `(x, y) -> (loss, logits)`, as the module an engine wraps (DDP must
    see the whole forward, whatever `forward_loss` a method defines)."""

    def __init__(self, method: methods.MethodModel):
        super().__init__()
        self.net = method.model
        self.method = method

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.method.forward_loss(x, y)


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
        try:
            self.data = datasets.build_pipeline(recipe.data, recipe.seed, process.rank, process.world_size)
        except datasets.DataError as e:  # name the recipe and its section too
            raise datasets.DataError(f"{source}: data: {e}") from None
        self.train_loader, self.val_loader = self.data.train, self.data.val
        info = methods.DataInfo(self.data.num_classes, self.data.input_shape, source)
        self.method = methods.build(recipe, info)
        engine = recipe.engine
        if engine.kind == "single" and process.distributed:
            raise RecipeError(f"{source}: engine.kind: single, but this is process {process.rank} of "
                              f"{process.world_size} ({process.launcher}); use ddp or deepspeed")
        if engine.grad_accum > 1 or engine.kind == "deepspeed":
            distributed.micro_batch_size(recipe.data.batch_size, process.world_size, engine.grad_accum, source)
        if engine.sync_bn and process.distributed:
            self.method.model = convert_to_global_batchnorm(self.method.model)
        self.model = self.method.model.to(self.device)
        self.num_classes = recipe.model.num_classes or self.data.num_classes
        self.optimizer = build_optimizer(recipe, self.model)
        self.iters_per_epoch = len(self.train_loader)
        if self.iters_per_epoch == 0:
            raise RecipeError(f"{source}: data.batch_size: {recipe.data.batch_size} is larger than the training "
                              f"set ({self.data.train_size} samples) and batches drop the remainder")
        self.scheduler = build_scheduler(self.optimizer, self.iters_per_epoch, recipe.optim.epochs,
                                         recipe.optim.warmup_iters, recipe.optim.schedule)
        precision_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[engine.precision]
        on_deepspeed = engine.kind == "deepspeed"  # DeepSpeed casts the model itself and scales fp16 losses
        self.deepspeed_config = deepspeed_engine.deepspeed_config(recipe, process.world_size, source) \
            if on_deepspeed else None
        self.autocast_dtype = None if on_deepspeed else precision_dtype
        self.input_dtype = (precision_dtype if on_deepspeed else None) or torch.float32
        self.scaler = torch.amp.GradScaler("cuda", enabled=engine.precision == "fp16" and not on_deepspeed)
        self.train_step: nn.Module | None = None  # set by parallelize()
        self.deepspeed = None  # the DeepSpeed engine, under engine.kind deepspeed
        self.deepspeed_checkpoint: dict[str, Any] | None = None  # {"tag", "world_size"} of the last one
        self.epoch, self.step, self.best_acc1 = 0, 0, -1.0
        self.mlflow_run_id: str | None = None
        if resume is not None:
            self.load_state(resume)

    # ----------------------------------------------------------------------------- state
    def state(self) -> dict[str, Any]:
        """Everything `last.pt` holds (a collective under DeepSpeed ZeRO-3: call it on every rank)."""
        on_deepspeed = self.deepspeed is not None
        model_state = deepspeed_engine.model_state(self.deepspeed, self.model, "net.") if on_deepspeed \
            else self.model.state_dict()
        return {
            "model": model_state, "optimizer": {} if on_deepspeed else self.optimizer.state_dict(),
            "deepspeed": self.deepspeed_checkpoint,
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "step": self.step, "best_acc1": self.best_acc1,
            "rng": checkpoint.rng_state(), "recipe": self.recipe.model_dump(mode="json"),
            "mlflow_run_id": self.mlflow_run_id,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.deepspeed_checkpoint = state.get("deepspeed")
        on_deepspeed = self.recipe.engine.kind == "deepspeed"
        if on_deepspeed != (self.deepspeed_checkpoint is not None):
            written = "with" if self.deepspeed_checkpoint else "without"
            raise RecipeError(f"{self.source}: engine.kind: {self.recipe.engine.kind} cannot resume a checkpoint "
                              f"written {written} DeepSpeed (its optimizer state is in that format)")
        self.model.load_state_dict(state["model"])
        if not on_deepspeed:  # DeepSpeed's optimizer state is loaded from its own checkpoint in parallelize()
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.best_acc1 = state["epoch"], state["step"], state["best_acc1"]
        self.mlflow_run_id = state.get("mlflow_run_id")
        checkpoint.set_rng_state(state["rng"])

    # ----------------------------------------------------------------------------- loop
    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def parallelize(self) -> None:
        """Apply the engine to the plain model (once; `fit` calls it after the method's `prepare`)."""
        if self.train_step is not None:
            return
        step_module = MethodStep(self.method)
        if self.recipe.engine.kind == "deepspeed":
            self.deepspeed, optimizer = deepspeed_engine.initialize(step_module, self.optimizer, self.deepspeed_config)
            if optimizer is not self.optimizer:  # DeepSpeed's own optimizer: the schedule drives it instead
                schedule_state = self.scheduler.state_dict()
                self.optimizer = optimizer
                self.scheduler = build_scheduler(optimizer, self.iters_per_epoch, self.recipe.optim.epochs,
                                                 self.recipe.optim.warmup_iters, self.recipe.optim.schedule)
                self.scheduler.load_state_dict(schedule_state)
            if self.deepspeed_checkpoint is not None:
                deepspeed_engine.load(self.deepspeed, self.run_dir, self.deepspeed_checkpoint,
                                      self.process.world_size, self.source)
            self.train_step = self.deepspeed
        elif self.process.distributed:
            self.train_step = distributed.apply_ddp(step_module, self.device)
        else:
            self.train_step = step_module

    def optimizer_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on this process's batch in `engine.grad_accum` equal micro-batches; returns the
        batch's mean loss and its logits (detached)."""
        x_parts, y_parts = x.chunk(self.recipe.engine.grad_accum), y.chunk(self.recipe.engine.grad_accum)
        micro_batches = len(x_parts)
        losses, outputs = [], []
        if self.deepspeed is None:
            self.optimizer.zero_grad(set_to_none=True)
        for i, (x_part, y_part) in enumerate(zip(x_parts, y_parts, strict=True)):
            with distributed.no_sync_unless(i == micro_batches - 1, self.train_step):
                with self.autocast():
                    loss, logits = self.train_step(x_part.to(self.input_dtype), y_part)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss.item()} at step {self.step}")
                if self.deepspeed is not None:  # DeepSpeed divides by its accumulation steps, steps on the last
                    self.deepspeed.backward(loss)
                    self.deepspeed.step()
                else:
                    self.scaler.scale(loss / micro_batches).backward()
            losses.append(loss.detach().float())
            outputs.append(logits.detach().float())
        if self.deepspeed is None:
            if self.recipe.optim.grad_clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.optim.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return torch.stack(losses).mean(), torch.cat(outputs)

    def train_epoch(self, progress: Progress | None) -> dict[str, float]:
        self.model.train()
        datasets.set_epoch(self.train_loader, self.epoch)
        if self.process.distributed:
            seed_everything(distributed.process_seed(self.recipe.seed, self.epoch, self.process.rank))
        task = progress.add_task(f"epoch {self.epoch + 1}/{self.recipe.optim.epochs}", total=self.iters_per_epoch,
                                 speed="", loss="") if progress else None
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, top-1, samples (this process)
        start = time.perf_counter()
        for x, y in self.train_loader:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            loss, logits = self.optimizer_step(x, y)
            self.scheduler.step()
            self.step += 1
            totals += torch.tensor([loss.item() * y.shape[0], topk_correct(logits, y, 1), y.shape[0]],
                                   dtype=torch.float64)
            if progress:
                rate = totals[2].item() * self.process.world_size / (time.perf_counter() - start)
                progress.update(task, advance=1, speed=f"{rate:,.0f} img/s", loss=f"loss {loss.item():.4f}")
        elapsed = time.perf_counter() - start
        if progress:
            progress.remove_task(task)
        if self.process.distributed and not self.recipe.engine.sync_bn:
            distributed.broadcast_buffers(self.model, self.process)
        loss_sum, correct, seen = self.reduce(totals).tolist()
        return {"train/loss": loss_sum / seen, "train/acc1": 100.0 * correct / seen,
                "train/img_per_s": seen / elapsed, "time/train_epoch_s": elapsed,
                "lr": self.optimizer.param_groups[0]["lr"]}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        totals = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1, top-5, samples
        with FiringRateMonitor(self.model) as monitor:
            for x, y in self.val_loader:
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                with self.autocast():
                    logits = self.model(x.to(self.input_dtype)).float()
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
        metrics.update(monitor.efficiency(self.recipe.efficiency.mac_pj, self.recipe.efficiency.ac_pj))
        return metrics

    def reduce(self, totals: torch.Tensor) -> torch.Tensor:
        """Sum counts (evaluation, training) over processes (identity in a single process)."""
        return distributed.all_reduce_sum(totals.to(self.device), self.process).cpu()

    def save(self, is_best: bool) -> None:
        """Rank 0 writes `last.pt` (and `best.pt`); under DeepSpeed every rank first writes its part."""
        if self.deepspeed is not None:
            tag = deepspeed_engine.save(self.deepspeed, self.run_dir, self.epoch)
            self.deepspeed_checkpoint = {"tag": tag, "world_size": self.process.world_size}
            state = self.state()
        elif self.process.is_main:
            state = self.state()
        if self.process.is_main:
            checkpoint.save_atomic(state, self.run_dir / checkpoint.LAST)
            if is_best:
                checkpoint.save_atomic({"model": state["model"], "recipe": state["recipe"], "epoch": self.epoch,
                                        "best_acc1": self.best_acc1}, self.run_dir / checkpoint.BEST)
            if self.deepspeed is not None:
                deepspeed_engine.prune(self.run_dir, self.deepspeed_checkpoint["tag"])
        distributed.barrier(self.process)

    def fit(self, tracker, on_epoch_end: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
        """Train from `self.epoch` to `optim.epochs`; log to `tracker`; return the summary.

        `on_epoch_end(epoch, metrics)` runs after each epoch's checkpoint (e.g. to report to Ray Tune)."""
        self.mlflow_run_id = tracker.run_id
        epochs, start, history = self.recipe.optim.epochs, time.perf_counter(), []
        if self.method.prepare is not None and self.epoch == 0 and self.step == 0:  # a new run, not a resume
            self.method.prepare(self)
        self.parallelize()
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
