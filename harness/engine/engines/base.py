"""The interface every engine implements, and the checks they share.

An engine owns how a step runs: it wraps the plain training module (`setup`), runs one optimizer step on
this process's batch (`train_step`: micro-batches, precision, backward, clipping, the optimizer and the
schedule, then the parameter bounds), keeps batch norm consistent across processes (`place`, `end_epoch`),
and owns its part of a checkpoint (`checkpoint_state`, `load_checkpoint_state`, `prune`). The loop
(`harness.engine.loop`) only calls these.

Step contract, for every engine, with N processes, A = `engine.grad_accum` micro-batches and B the global
batch (`data.batch_size`): each process holds B/N samples and splits them into A equal micro-batches; the
step's gradient is that of the mean loss over the B samples (batch-norm statistics excepted, which are per
micro-batch, over all processes with `engine.sync_bn`).

Parameter bounds (DSR.md section 3, V <- max(V, V_bound)): after every optimizer step the engine clamps each
bounded parameter (`harness.snn.parameter_bounds`) in the copy the optimizer actually updates: the parameter
itself for local and DDP, DeepSpeed's fp32 master copy (and the working copy) under ZeRO.

Step health, one small all-reduce and one host read per step (`agree`): whether any process's loss (any
micro-batch) or the global gradient norm is NaN/infinite, and whether any process was asked to stop
(preemption). Every process therefore takes the same decision at the same step: stop with one line naming
the step and the first non-finite tensor (`NonFiniteError`: the loss and the ranks it is bad on, or the
first parameter whose gradient is bad), or with `optim.skip_nonfinite` skip the optimizer step (gradients
dropped, the schedule still advances: the batch was consumed) and report it in `StepOutcome.skipped`.
With fp16 loss scaling an infinite gradient is the scaler's business (it skips the step and lowers the
scale) and is not a fault.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.engine.distributed import ProcessInfo, all_reduce_sum, broadcast_buffers
from harness.engine.precision import Precision
from harness.engine.sync_bn import convert_to_global_batchnorm
from harness.errors import HarnessError
from harness.recipe import EngineConfig
from harness.snn import parameter_bounds

SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


class NonFiniteError(HarnessError):
    """A step's loss or gradient (or a weight about to be saved) was NaN or infinite: one line, exit code 3."""

    exit_code = 3


@dataclass(frozen=True)
class StepOutcome:
    """What `Engine.train_step` did. `loss` (mean over micro-batches) and `logits` are detached fp32 on the
    device; `skipped`: the step's loss or gradient was not finite and no optimizer step was taken
    (`optim.skip_nonfinite`); `stop`: some process was asked to stop (agreed by all)."""

    loss: torch.Tensor
    logits: torch.Tensor
    skipped: bool = False
    stop: bool = False


class Engine(ABC):
    """One way of running training steps; see the module docstring for the contract.

    Args:
        cfg: the recipe's `engine` section.
        grad_clip: `optim.grad_clip`, the maximal global gradient norm (None: no clipping).
        process: this process's rank and world size.
        device: where this process computes.
    """

    kind: str

    def __init__(self, cfg: EngineConfig, grad_clip: float | None, process: ProcessInfo, device: torch.device,
                 skip_nonfinite: bool = False):
        self.cfg, self.grad_clip, self.process, self.device = cfg, grad_clip, process, device
        self.skip_nonfinite = skip_nonfinite
        self.precision = Precision(cfg.precision, device.type, engine_casts_model=self.kind == "deepspeed")
        self.model: nn.Module | None = None  # the plain model (set by setup)
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.bounds: list[tuple[nn.Parameter, float]] = []

    # ------------------------------------------------------------------------------------ building
    def place(self, model: nn.Module) -> nn.Module:
        """The plain model made ready for this engine and moved to its device (before the optimizer is built):
        with `engine.sync_bn` in a multi-process job, batch norm over the global batch (`GlobalBatchNorm`)."""
        if self.cfg.sync_bn and self.process.distributed:
            model = convert_to_global_batchnorm(model)
        return model.to(self.device)

    @abstractmethod
    def setup(self, step_module: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
              make_scheduler: SchedulerFactory) -> None:
        """Wrap `step_module` (`(x, y) -> (loss, logits)` around the plain `model`) and take the optimizer and
        the schedule built on it."""

    # ------------------------------------------------------------------------------------ stepping
    @abstractmethod
    def train_step(self, x: torch.Tensor, y: torch.Tensor, step: int, stop_requested: bool = False) -> StepOutcome:
        """One optimizer step on this process's batch (or none, if skipped). `step` is the number of this step
        in the run (1-based), for messages; `stop_requested`: this process was asked to stop (agreed with the
        others in the outcome)."""

    def micro_batches(self, x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        parts = self.cfg.grad_accum
        return list(zip(x.to(self.precision.input_dtype).chunk(parts), y.chunk(parts), strict=True))

    def agree(self, step: int, losses: list[torch.Tensor], grad_norm: torch.Tensor | None,
              stop_requested: bool) -> tuple[bool, bool]:
        """`(not finite, stop)` as every process sees them (a collective; the step's one host read). Raises
        `NonFiniteError` on every process when a loss or gradient is not finite and skipping is off."""
        world = self.process.world_size
        flags = torch.zeros(world + 2, device=self.device)
        flags[self.process.rank] = (~torch.isfinite(torch.stack(losses))).any().float()
        if grad_norm is not None:
            flags[world] = (~torch.isfinite(grad_norm)).float()
        flags[world + 1] = float(stop_requested)
        flags = all_reduce_sum(flags, self.process).tolist()
        bad_ranks = [r for r in range(world) if flags[r]]
        bad = bool(bad_ranks) or flags[world] > 0
        if bad and not self.skip_nonfinite:
            raise NonFiniteError(self.nonfinite_message(step, bad_ranks))
        return bad, flags[world + 1] > 0

    def nonfinite_message(self, step: int, bad_ranks: list[int]) -> str:
        """Names the first non-finite tensor: the loss (and where), else the first parameter whose gradient
        is bad (slow path, only on failure)."""
        advice = "lower optim.lr, set optim.grad_clip, or set optim.skip_nonfinite: true to skip such steps"
        if bad_ranks:
            where = f" on rank {', '.join(map(str, bad_ranks))}" if self.process.distributed else ""
            return f"step {step}: the loss is not finite (NaN or infinity){where}: {advice}"
        name = next((n for n, p in self.model.named_parameters()
                     if p.grad is not None and not bool(torch.isfinite(p.grad).all())), "(a parameter on another rank)")
        return f"step {step}: the gradient of {name} is not finite (NaN or infinity), the loss is finite: {advice}"

    def collect_bounds(self, model: nn.Module) -> None:
        self.bounds = parameter_bounds(model)

    @torch.no_grad()
    def apply_bounds(self) -> None:
        """Clamp every bounded parameter in place (local and DDP: the parameter is what the optimizer steps)."""
        for param, bound in self.bounds:
            param.clamp_(min=bound)

    def end_epoch(self) -> None:
        """Called by the loop after each training epoch: without sync_bn every process's batch norm kept its
        own running statistics, and rank 0's are broadcast so that evaluation and checkpoints agree."""
        if self.process.distributed and not self.cfg.sync_bn:
            broadcast_buffers(self.model, self.process)

    # ------------------------------------------------------------------------------------ checkpoints
    @abstractmethod
    def checkpoint_state(self, run_dir: Path, tag: str) -> dict[str, Any]:
        """This engine's part of `last.pt`: model, optimizer, scheduler and scaler states (a collective under
        DeepSpeed, which also writes its partitioned part under `run_dir`; call it on every rank)."""

    @abstractmethod
    def load_checkpoint_state(self, state: dict[str, Any], run_dir: Path) -> None:
        """Restore what `checkpoint_state` returned (after `setup`)."""

    def prune(self, run_dir: Path, keep: str) -> None:  # noqa: B027  (only DeepSpeed writes parts)
        """Delete parts of older checkpoints once `last.pt` names `keep` (rank 0)."""

    def model_state(self) -> dict[str, torch.Tensor]:
        """The plain model's full state dict."""
        return self.model.state_dict()
