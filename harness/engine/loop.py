"""The training loop: one epoch of steps, an evaluation, a checkpoint; repeat (nanoGPT-sized).

`Trainer(recipe, run_dir, resume, process)` composes a run from its recipe sections: the engine
(`engines.build_engine`: local, DDP or DeepSpeed), the data pipeline (`harness.data`), the method's model
and loss built from `model`, `method` and what the data says (`harness.methods`), the optimizer and the
per-iteration schedule (`build.py`, `schedule.py`) and the checkpointer (`checkpoint.py`). It never
branches on the engine: the engine runs each step, sums over processes and owns its checkpoint part.
Its own state is a few counters (epoch, step, step in the epoch, best top-1, non-finite steps in a row).

`fit(tracker, stop=...)` (a new run: the method's `prepare` hook first, e.g. threshold calibration; a
resumed one: the checkpoint's states) trains the remaining epochs; after each: evaluation on the validation
set (top-1, top-5 where classes > 5, firing rate of every spiking layer, every threshold, synaptic
operations and energy, all summed over processes), the method's `extra_eval`, metrics to the tracker,
`last.pt` (and `best.pt` on a new best). Every epoch's batches are a pure function of (seed, epoch, rank),
and in a distributed run each rank reseeds its global RNG (dropout) at each epoch from (seed, epoch, rank).
Rank 0 alone logs and writes; every rank loads the checkpoint on resume.

Mid-epoch checkpoints: every `engine.checkpoint_every` steps, and at the step boundary after a stop request
(`preemption.StopRequest`: SIGTERM, SIGUSR1; then `Preempted`, exit 75), `last.pt` is written with the steps
done in the epoch, the epoch's training totals so far and the RNG states of that moment. Resuming one replays
the epoch's loader up to that step without computing anything (so the data order and every loader worker's
augmentation stream are those of an uninterrupted run; the cost is reading those batches once more), then
restores the RNG states: on the CPU the run ends with exactly the weights of an uninterrupted one.
No host synchronisation per step: the epoch's totals (loss, top-1, samples) accumulate on the device and are
read once, at the end of the epoch; the progress bar reads the loss at most once a second; the engine's health
flags are read one step late, or at once before a checkpoint (`Engine.settle`).
Non-finite steps: the engine stops the run (`NonFiniteError`), or with `optim.skip_nonfinite` skips them;
the loop counts them (`train/skipped_steps` per epoch, not in the epoch's loss and accuracy) and gives up after
`optim.max_skips_in_a_row` in a row.
"""

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness import data as datasets
from harness import methods
from harness.engine import checkpoint, distributed
from harness.engine.build import build_optimizer, configure_cuda, pick_device, seed_everything
from harness.engine.context import RunContext
from harness.engine.engines import NonFiniteError, build_engine
from harness.engine.evaluation import evaluate_outputs, topk_correct
from harness.engine.preemption import Preempted, StopRequest
from harness.engine.progress import epoch_bar, epoch_line, progress_bar
from harness.engine.schedule import build_scheduler
from harness.recipe import Recipe, RecipeError
from harness.snn import kernels
from harness.snn.stats import FiringRateMonitor, spiking_layers


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
    """Builds a run's components from its recipe sections and trains it.

    Args:
        recipe: the resolved recipe.
        run_dir: folder for `last.pt`, `best.pt`.
        resume: a loaded checkpoint to continue from, or None.
        process: rank and world size of this process.
    """

    def __init__(self, recipe: Recipe, run_dir: Path, resume: dict | None = None,
                 process: distributed.ProcessInfo | None = None):
        self.recipe, self.process = recipe, process or distributed.ProcessInfo()
        if recipe.engine.threads:
            torch.set_num_threads(recipe.engine.threads)
        seed_everything(recipe.seed)
        device = pick_device(recipe.engine, self.process)
        configure_cuda(recipe.engine, device)
        kernels.select(recipe.engine.neuron_kernel)
        kernels.check_selected(device.type)  # builds the CPU kernel now (once per checkout), before any step
        self.engine = build_engine(recipe.engine, recipe.data.batch_size, recipe.optim.grad_clip, self.process, device,
                                   skip_nonfinite=recipe.optim.skip_nonfinite)
        try:
            self.data = datasets.build_pipeline(recipe.data, recipe.seed, self.process.rank, self.process.world_size,
                                                device)
        except datasets.DataError as e:  # name the recipe section too
            raise datasets.DataError(f"data: {e.message}", file=e.file) from None
        num_classes = recipe.model.num_classes or self.data.num_classes
        self.method = methods.build(recipe.model, recipe.method, methods.DataInfo(num_classes, self.data.input_shape))
        self.model = self.method.model = self.engine.place(self.method.model)
        self.optimizer = build_optimizer(recipe.optim, self.model, self.engine.fuses_optimizer)
        self.iters_per_epoch = len(self.data.train)
        if self.iters_per_epoch == 0:
            raise RecipeError(f"data.batch_size: {recipe.data.batch_size} is larger than the training set "
                              f"({self.data.train_size} samples) and batches drop the remainder")
        self.context = RunContext(device, self.process, self.engine.precision, self.data.train, self.data.val,
                                  num_classes, recipe.efficiency.mac_pj, recipe.efficiency.ac_pj)
        self.checkpointer = checkpoint.Checkpointer(run_dir, self.process)
        self.run_dir = Path(run_dir)
        self.resume_state = resume
        self.epoch, self.step, self.best_acc1 = 0, 0, -1.0
        self.epoch_step, self.skipped_in_a_row = 0, 0  # steps done in the current epoch; non-finite in a row
        self.pending_rng: dict | None = None  # a resumed run's RNG states, restored where they were saved
        self.partial_epoch: dict | None = None  # a mid-epoch checkpoint's totals of its epoch so far
        if resume is not None:
            self.epoch, self.step, self.best_acc1 = resume["epoch"], resume["step"], resume["best_acc1"]
            self.epoch_step, self.skipped_in_a_row = resume.get("epoch_step", 0), resume.get("skipped_in_a_row", 0)
            self.pending_rng, self.partial_epoch = resume["rng"], resume.get("partial_epoch")
        self.mlflow_run_id: str | None = resume.get("mlflow_run_id") if resume else None
        self.started = False

    def start(self) -> None:
        """Before the first step: the method's `prepare` (a new run), the engine set up around the model, and
        the checkpoint's states (a resumed run)."""
        if self.started:
            return
        if self.resume_state is None and self.method.prepare is not None:
            self.method.prepare(self.context)
        optim = self.recipe.optim
        self.engine.setup(MethodStep(self.method), self.model, self.optimizer,
                          lambda opt: build_scheduler(opt, self.iters_per_epoch, optim.epochs, optim.warmup_iters,
                                                      optim.schedule))
        if self.resume_state is not None:
            self.engine.load_checkpoint_state(self.resume_state, self.run_dir)
            self.resume_state = None
        self.started = True

    def _restore_rng(self) -> None:
        if self.pending_rng is not None:
            checkpoint.set_rng_state(self.pending_rng, self.engine.device)
            self.pending_rng = None

    def train_epoch(self, progress, stop: StopRequest | None = None) -> dict[str, float]:
        """One epoch from `self.epoch_step` on (0 unless resumed mid-epoch); `stop` is polled after each step."""
        stop = stop or StopRequest()  # not entered: never requested
        self.model.train()
        if self.epoch_step == 0:  # resumed at an epoch boundary: the states of the end of the last epoch
            self._restore_rng()
        datasets.set_epoch(self.data.train, self.epoch)
        if self.process.distributed:
            seed_everything(distributed.process_seed(self.recipe.seed, self.epoch, self.process.rank))
        device = self.context.device
        partial, self.partial_epoch = self.partial_epoch or {}, None
        # loss sum, top-1, samples of this process (steps not skipped); a checkpoint holds them summed over
        # processes, which rank 0 takes on resume
        totals = torch.zeros(3, dtype=torch.float64)
        if "totals" in partial and self.process.is_main:
            totals = partial["totals"]
        totals = totals.to(device)
        skipped, elapsed_before = partial.get("skipped", 0), partial.get("elapsed_s", 0.0)
        batches = iter(self.data.train)
        for _ in range(self.epoch_step):  # resumed mid-epoch: replay the loader up to the checkpoint's step
            next(batches)
        self._restore_rng()
        every, start = self.recipe.engine.checkpoint_every, time.perf_counter()
        with epoch_bar(progress, f"epoch {self.epoch + 1}/{self.recipe.optim.epochs}", self.iters_per_epoch,
                       self.process.world_size, completed=self.epoch_step) as bar:
            for x, y in batches:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                outcome = self.engine.train_step(x, y, self.step + 1, stop_requested=stop.requested)
                self.step += 1
                self.epoch_step += 1
                n = y.shape[0]
                if outcome.skipped:
                    skipped += 1
                    self._count_skip()
                else:
                    self.skipped_in_a_row = 0
                    totals += torch.stack([outcome.loss.double() * n, topk_correct(outcome.logits, y, 1).double(),
                                           totals.new_full((), n)])  # a fill, not a host-to-device copy
                bar.advance(outcome.loss, n)
                # one process stops at the boundary right after the signal; several at the one after they agreed
                stopping = outcome.stop or (stop.requested and not self.process.distributed)
                if stopping or (every and self.step % every == 0 and self.epoch_step < self.iters_per_epoch):
                    stopping = self.engine.settle() or stopping  # this step's health, read before writing
                    self.checkpointer.save(self.engine, self.counters(), self.recipe.model_dump(mode="json"),
                                           self.mlflow_run_id, partial_epoch={
                                               "totals": self.context.reduce_sum(totals).cpu(), "skipped": skipped,
                                               "elapsed_s": elapsed_before + time.perf_counter() - start})
                if stopping:
                    by = stop.name if stop.requested else "a signal to another process"
                    raise Preempted(f"stopped by {by} at step {self.step} (epoch {self.epoch + 1}, step "
                                    f"{self.epoch_step} of {self.iters_per_epoch}); checkpoint "
                                    f"{self.run_dir / checkpoint.LAST}")
        self.engine.settle()  # the epoch's last step's health; a stop agreed there is taken at the next step
        elapsed = elapsed_before + time.perf_counter() - start
        self.epoch_step = 0
        self.engine.end_epoch()
        loss_sum, correct, seen = self.context.reduce_sum(totals).tolist()
        seen_or_nan = seen or float("nan")
        return {"train/loss": loss_sum / seen_or_nan, "train/acc1": 100.0 * correct / seen_or_nan,
                "train/img_per_s": seen / elapsed, "time/train_epoch_s": elapsed, "train/skipped_steps": skipped,
                "lr": self.engine.optimizer.param_groups[0]["lr"]}

    def _count_skip(self) -> None:
        self.skipped_in_a_row += 1
        limit = self.recipe.optim.max_skips_in_a_row
        if self.skipped_in_a_row >= limit:
            raise NonFiniteError(f"step {self.step}: {self.skipped_in_a_row} steps in a row had a non-finite loss or "
                                 f"gradient (optim.max_skips_in_a_row: {limit}); giving up: lower optim.lr or set "
                                 f"optim.grad_clip; {self.run_dir / checkpoint.LAST} is the last good checkpoint")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        with FiringRateMonitor(self.model) as monitor:
            scores = evaluate_outputs(lambda x: {"model": self.model(x)}, self.context)["model"]
        monitor.reduce(self.context.reduce_sum)
        metrics = {f"test/{name}": value for name, value in scores.items()}
        if self.method.spiking:
            metrics["firing_rate/mean"] = monitor.mean_rate()
            metrics.update({f"firing_rate/{name}": r for name, r in monitor.rates().items()})
            metrics.update({f"vth/{name}": float(m.vth) for name, m in spiking_layers(self.model).items()
                            if hasattr(m, "vth")})
        metrics.update(monitor.efficiency(self.recipe.efficiency.mac_pj, self.recipe.efficiency.ac_pj))
        if self.method.extra_eval is not None:  # last: it may replace the headline metrics (qcfs: its SNN's)
            metrics.update(self.method.extra_eval(self.context))
        split = self.recipe.data.eval_split  # val: a held-out part of the training data (data.holdout)
        return {f"{split}/{k.removeprefix('test/')}" if k.startswith("test/") else k: v for k, v in metrics.items()}

    def counters(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "best_acc1": self.best_acc1, "epoch_step": self.epoch_step,
                "skipped_in_a_row": self.skipped_in_a_row}

    def fit(self, tracker, on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
            stop: StopRequest | None = None) -> list[dict]:
        """Train from `self.epoch` to `optim.epochs`, logging to `tracker`; return each epoch's metrics.

        `on_epoch_end(epoch, metrics)` runs after each epoch's checkpoint (e.g. to report to Ray Tune);
        `stop` (a `StopRequest` entered by the caller) makes the run checkpoint and raise `Preempted` at the next
        step boundary once requested; the tracker's run gets the tag `stopped`."""
        self.mlflow_run_id = tracker.run_id
        self.start()
        epochs, history = self.recipe.optim.epochs, []
        with progress_bar(self.process.is_main) as progress:
            while self.epoch < epochs:
                try:
                    metrics = self.train_epoch(progress, stop)
                except Preempted as stopped:
                    tracker.set_tag("stopped", stopped.message)
                    raise
                metrics.update(self.evaluate())
                self.epoch += 1
                split = self.recipe.data.eval_split
                is_best = metrics[f"{split}/acc1"] > self.best_acc1
                self.best_acc1 = max(self.best_acc1, metrics[f"{split}/acc1"])
                metrics[f"{split}/best_acc1"] = self.best_acc1
                tracker.log_metrics(metrics, step=self.epoch)
                self.checkpointer.save(self.engine, self.counters(), self.recipe.model_dump(mode="json"),
                                       self.mlflow_run_id, is_best=is_best)
                history.append(metrics)
                if self.process.is_main:
                    progress.console.print(epoch_line(self.epoch, epochs, metrics), soft_wrap=True)
                if on_epoch_end is not None:
                    on_epoch_end(self.epoch, metrics)
        return history

    def final_state(self) -> dict[str, torch.Tensor]:
        """The trained model's full state dict (a collective under DeepSpeed ZeRO-3)."""
        return self.engine.model_state()
