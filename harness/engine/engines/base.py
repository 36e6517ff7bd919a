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

Step health, one small all-reduce per step and no host synchronisation (`agree`): whether any process's loss
(any micro-batch) or the global gradient norm is NaN/infinite, and whether any process was asked to stop
(preemption). The flags are reduced on the device and copied to the host asynchronously; the loop reads step
k's flags while step k+1 is already queued (on CUDA the stream never waits for the host), or at once through
`settle()`, which the loop calls before every checkpoint and at the end of every epoch. Every process reads the
same flags at the same step, and therefore takes the same decision: stop with one line naming the step and the
first non-finite tensor (`NonFiniteError`: the loss and the ranks it is bad on, or the first parameter whose
gradient is bad, found on the device from the per-parameter norms), raised one step later than the fault, but
before anything is written (the checkpointer also refuses non-finite weights). With `optim.skip_nonfinite` the
decision must precede the optimizer step: the flags are read at once (one host read per step, the price of
skipping) and a bad step is skipped (gradients dropped, the schedule still advances: the batch was consumed)
and reported in `StepOutcome.skipped`. With fp16 loss scaling an infinite gradient is the scaler's business
(it skips the step and lowers the scale) and is not a fault.

`engine.compile` wraps the training module in `torch.compile` (`compiled`); `engine.channels_last` puts the
model and every input batch in channels-last layout (`place`, `micro_batches`).
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


def to_layout(x: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """An input batch in `dtype` and the layout of `engine.channels_last` (one copy at most): images [B, C, H, W]
    channels-last, frame sequences [B, T, C, H, W] channels-last per frame ([B, T, H, W, C] in memory; the time
    encoders keep it); else as it is."""
    if channels_last and x.dim() == 4:
        return x.to(dtype, memory_format=torch.channels_last)
    if channels_last and x.dim() == 5:
        frames_last = x.permute(0, 1, 3, 4, 2)
        if not (frames_last.is_contiguous() and x.dtype == dtype):
            frames_last = torch.empty(frames_last.shape, dtype=dtype, device=x.device).copy_(frames_last)
        return frames_last.permute(0, 1, 4, 2, 3)
    return x.to(dtype)


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


@dataclass
class PendingHealth:
    """One step's health flags on their way to the host: `[loss bad per rank..., gradient bad, stop, first bad
    parameter + 1]`; `ready` is the CUDA event after their copy (None on the CPU, where they are there)."""

    step: int
    flags: torch.Tensor
    ready: torch.cuda.Event | None = None

    def read(self) -> list[float]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.flags.tolist()


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
        self.pending: PendingHealth | None = None  # the last step's health flags, not read yet
        self.host_flags: list[torch.Tensor] = []  # CUDA: two pinned buffers the flags are copied into, in turn

    # ------------------------------------------------------------------------------------ building
    @property
    def fuses_optimizer(self) -> bool:
        """Whether the recipe's torch optimizer is built fused (`engine.fused_optimizer`, on CUDA)."""
        return self.cfg.fused_optimizer and self.device.type == "cuda"

    def place(self, model: nn.Module) -> nn.Module:
        """The plain model made ready for this engine and moved to its device (before the optimizer is built):
        with `engine.sync_bn` in a multi-process job, batch norm over the global batch (`GlobalBatchNorm`); with
        `engine.channels_last`, 4-D weights in channels-last layout."""
        if self.cfg.sync_bn and self.process.distributed:
            model = convert_to_global_batchnorm(model)
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.cfg.channels_last else model

    def compiled(self, module: nn.Module) -> nn.Module:
        """`module` under `torch.compile` with `engine.compile`, else itself."""
        return torch.compile(module) if self.cfg.compile else module

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
        x = to_layout(x, self.precision.input_dtype, self.cfg.channels_last)
        return list(zip(x.chunk(parts), y.chunk(parts), strict=True))

    def gradient_norms(self) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """`(global gradient norm, per-parameter norms)` over the parameters that have a gradient, on the device
        (one fused pass; the per-parameter norms name a non-finite gradient without reading it back)."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return None, None
        norms = torch.stack([n.float() for n in torch._foreach_norm(grads)])
        return torch.linalg.vector_norm(norms), norms

    def agree(self, step: int, losses: list[torch.Tensor], grad_norm: torch.Tensor | None,
              stop_requested: bool, param_norms: torch.Tensor | None = None) -> tuple[bool, bool]:
        """`(not finite, stop)` as every process sees them (see the module docstring: a collective; read at once
        with `optim.skip_nonfinite`, else one step later). Raises `NonFiniteError` on every process when a loss or
        gradient is not finite and skipping is off."""
        world = self.process.world_size
        flags = torch.zeros(world + 3, device=self.device)
        flags[self.process.rank] = (~torch.isfinite(torch.stack(losses))).any().float()
        if grad_norm is not None:
            flags[world] = (~torch.isfinite(grad_norm)).float()
        flags[world + 1] = float(stop_requested)
        if param_norms is not None and self.process.is_main:  # gradients are identical on every rank
            bad = ~torch.isfinite(param_norms)
            flags[world + 2] = torch.where(bad.any(), bad.int().argmax() + 1, 0).float()
        flags = all_reduce_sum(flags, self.process)
        if self.skip_nonfinite:
            return self._decide(PendingHealth(step, flags))
        ready = None
        if flags.device.type == "cuda":  # into one of two pinned buffers: the other may still hold the last step's
            if not self.host_flags:
                self.host_flags = [torch.empty(flags.shape, pin_memory=True) for _ in range(2)]
            self.host_flags.reverse()
            flags = self.host_flags[0].copy_(flags, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        previous, self.pending = self.pending, PendingHealth(step, flags, ready)
        return False, self._decide(previous)[1] if previous is not None else False

    def settle(self) -> bool:
        """Read the last step's flags now (raising `NonFiniteError` if it was not finite); whether a stop was
        agreed. The loop calls it before writing anything and at the end of each epoch."""
        previous, self.pending = self.pending, None
        return self._decide(previous)[1] if previous is not None else False

    def _decide(self, health: PendingHealth) -> tuple[bool, bool]:
        world = self.process.world_size
        flags = health.read()
        bad_ranks = [r for r in range(world) if flags[r]]
        bad = bool(bad_ranks) or flags[world] > 0
        if bad and not self.skip_nonfinite:
            raise NonFiniteError(self.nonfinite_message(health.step, bad_ranks, int(flags[world + 2]) - 1))
        return bad, flags[world + 1] > 0

    def nonfinite_message(self, step: int, bad_ranks: list[int], bad_param: int = -1) -> str:
        """Names the first non-finite tensor: the loss (and where), else the first parameter whose gradient
        was bad (`bad_param`, its index among the parameters with a gradient; -1: not known)."""
        advice = "lower optim.lr, set optim.grad_clip, or set optim.skip_nonfinite: true to skip such steps"
        if bad_ranks:
            where = f" on rank {', '.join(map(str, bad_ranks))}" if self.process.distributed else ""
            return f"step {step}: the loss is not finite (NaN or infinity){where}: {advice}"
        names = [n for n, p in self.model.named_parameters() if p.grad is not None]  # as `gradient_norms` saw them
        name = names[bad_param] if 0 <= bad_param < len(names) else "a parameter"
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
