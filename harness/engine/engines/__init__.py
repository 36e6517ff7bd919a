"""Engines (`engine.kind`), one interface (`base.Engine`): local (one process), DDP, DeepSpeed.

`check_job(cfg, batch_size, process)` refuses a job the engine cannot run as the recipe means it (a
`single` engine in a multi-process job; a global batch that does not split exactly over the processes and
micro-batches); `harness launch` calls it before joining the process group, `build_engine` again.
`build_engine(cfg, batch_size, grad_clip, process, device, skip_nonfinite)` returns the engine. DeepSpeed is
imported only by its engine.
"""

import torch

from harness.data.pipeline import per_process_batch
from harness.engine.distributed import ProcessInfo
from harness.engine.engines.base import Engine, NonFiniteError, StepOutcome
from harness.engine.engines.ddp import DDPEngine
from harness.engine.engines.deepspeed import DeepSpeedEngine
from harness.engine.engines.local import LocalEngine
from harness.recipe import EngineConfig, RecipeError


def check_job(cfg: EngineConfig, batch_size: int, process: ProcessInfo) -> None:
    if cfg.kind == "single" and process.distributed:
        raise RecipeError(f"engine.kind: single, but this is process {process.rank} of {process.world_size} "
                          f"({process.launcher}); use ddp or deepspeed")
    per_process_batch(batch_size, process.world_size, cfg.grad_accum)


def build_engine(cfg: EngineConfig, batch_size: int, grad_clip: float | None, process: ProcessInfo,
                 device: torch.device, skip_nonfinite: bool = False) -> Engine:
    check_job(cfg, batch_size, process)
    if cfg.kind == "deepspeed":
        return DeepSpeedEngine(cfg, grad_clip, process, device, batch_size, skip_nonfinite=skip_nonfinite)
    return (DDPEngine if cfg.kind == "ddp" else LocalEngine)(cfg, grad_clip, process, device,
                                                              skip_nonfinite=skip_nonfinite)


__all__ = ["DDPEngine", "DeepSpeedEngine", "Engine", "LocalEngine", "NonFiniteError", "StepOutcome", "build_engine",
           "check_job"]
