"""`engine.kind: single`: one process, the plain module, torch autocast and (fp16) a gradient scaler.

A step: zero the gradients; for each of `engine.grad_accum` micro-batches, forward under autocast and backward of
loss / grad_accum (scaled under fp16; the training module under `torch.compile` with `engine.compile`); unscale and
take the global gradient norm (one fused pass); agree with the other processes on the step's health
(`Engine.agree`: non-finite loss or gradient, stop request); then either clip to `optim.grad_clip`, step the
optimizer, step the schedule and apply the parameter bounds, or (a non-finite step under `optim.skip_nonfinite`)
drop the gradients and only step the schedule. `DDPEngine` reuses the step and only wraps the module and keeps
gradients local on all micro-batches but the last.
The model and optimizer states are fp32 whatever `engine.precision`, so a run resumes in another precision: a
checkpoint written in fp32 or bf16 has no loss scale, and one resumed in fp16 starts from GradScaler's initial scale.
"""

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.engine.engines.base import Engine, SchedulerFactory, StepOutcome
from harness.recipe import RecipeError


class LocalEngine(Engine):
    kind = "single"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.scales_loss)
        self.train_module: nn.Module | None = None

    def setup(self, step_module: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
              make_scheduler: SchedulerFactory) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, make_scheduler(optimizer)
        self.collect_bounds(model)
        self.train_module = self.compiled(self.wrap(step_module))

    def wrap(self, step_module: nn.Module) -> nn.Module:
        return step_module

    def keep_gradients_local(self, last_micro_batch: bool):
        """Context of a micro-batch's forward and backward (DDP: no all-reduce before the last)."""
        return nullcontext()

    def train_step(self, x: torch.Tensor, y: torch.Tensor, step: int, stop_requested: bool = False) -> StepOutcome:
        parts = self.micro_batches(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        losses, outputs = [], []
        for i, (x_part, y_part) in enumerate(parts):
            with self.keep_gradients_local(i == len(parts) - 1):
                with self.precision.autocast():
                    loss, logits = self.train_module(x_part, y_part)
                self.scaler.scale(loss / len(parts)).backward()
            losses.append(loss.detach().float())
            outputs.append(logits.detach().float())
        unscaled = bool(self.grad_clip) or not self.precision.scales_loss
        grad_norm = param_norms = None
        if unscaled:
            self.scaler.unscale_(self.optimizer)
            grad_norm, param_norms = self.gradient_norms()
        # under fp16 loss scaling an infinite gradient is the scaler's to handle (it skips the step)
        scaled = self.precision.scales_loss
        bad, stop = self.agree(step, losses, None if scaled else grad_norm, stop_requested,
                               None if scaled else param_norms)
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            if unscaled and self.precision.scales_loss:
                self.scaler.update()  # closes the unscale_ above; lowers the scale as after an overflow
        else:
            if self.grad_clip and grad_norm is not None:
                nn.utils.clip_grads_with_norm_(self.model.parameters(), self.grad_clip, grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.apply_bounds()
        self.scheduler.step()
        return StepOutcome(torch.stack(losses).mean(), torch.cat(outputs), skipped=bad, stop=stop)

    def checkpoint_state(self, run_dir: Path, tag: str) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_checkpoint_state(self, state: dict[str, Any], run_dir: Path) -> None:
        if state.get("deepspeed") is not None:
            raise RecipeError(f"engine.kind: {self.kind} cannot resume a checkpoint written with DeepSpeed (its "
                              "optimizer state is in DeepSpeed's format); resume it with engine.kind deepspeed")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] or not self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])  # a disabled scaler ignores it (fp16 resumed in fp32/bf16)
        # else: written in fp32/bf16 (a disabled scaler saves nothing), resumed in fp16: the scale starts afresh
