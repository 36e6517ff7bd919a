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

Non-finite loss: before its backward every micro-batch's loss is checked on every process with one small
all-reduce, so all processes stop at the same step with the same message (`NonFiniteLoss`), instead of the
healthy ones waiting in a collective for the failed one.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.engine.distributed import ProcessInfo, all_reduce_sum, broadcast_buffers
from harness.engine.precision import Precision
from harness.engine.sync_bn import convert_to_global_batchnorm
from harness.recipe import EngineConfig
from harness.snn import parameter_bounds

SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


class NonFiniteLoss(FloatingPointError):
    """The loss of a step was NaN or infinite on at least one process."""


class Engine(ABC):
    """One way of running training steps; see the module docstring for the contract.

    Args:
        cfg: the recipe's `engine` section.
        grad_clip: `optim.grad_clip`, the maximal global gradient norm (None: no clipping).
        process: this process's rank and world size.
        device: where this process computes.
    """

    kind: str

    def __init__(self, cfg: EngineConfig, grad_clip: float | None, process: ProcessInfo, device: torch.device):
        self.cfg, self.grad_clip, self.process, self.device = cfg, grad_clip, process, device
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
    def train_step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on this process's batch; returns its mean loss and logits (detached, fp32, on
        the device). `step` is the global step, for messages."""

    def micro_batches(self, x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        parts = self.cfg.grad_accum
        return list(zip(x.to(self.precision.input_dtype).chunk(parts), y.chunk(parts), strict=True))

    def check_finite(self, loss: torch.Tensor, step: int) -> None:
        """Raise `NonFiniteLoss` on every process if any process's `loss` is not finite (a collective)."""
        bad = torch.zeros(self.process.world_size, device=loss.device)
        bad[self.process.rank] = (~torch.isfinite(loss.detach())).float()
        bad = all_reduce_sum(bad, self.process)
        if bool(bad.any()):
            ranks = ", ".join(str(r) for r in bad.nonzero().flatten().tolist())
            where = f" on rank {ranks}" if self.process.distributed else ""
            raise NonFiniteLoss(f"the loss is not finite at step {step}{where} (NaN or infinity): lower optim.lr, "
                                "set optim.grad_clip, or check the data")

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
