"""Components of a run built from their recipe sections: the device, the optimizer, the global seed.

Each takes only its section (torchtitan style); `harness.engine.loop.Trainer` composes them.
"""

import os
import random

import torch
from torch import nn

from harness.engine.distributed import ProcessInfo
from harness.recipe import EngineConfig, OptimConfig, RecipeError


def pick_device(cfg: EngineConfig, process: ProcessInfo, environ: dict[str, str] | None = None) -> torch.device:
    """`engine.device` resolved for this process (auto: CUDA where torch sees it).

    On CUDA, local rank r takes visible GPU r: every process of a node gets a GPU of its own. Where a launcher
    binds one GPU to each process (SLURM's `--gpus-per-task` or `--gpu-bind`: one GPU visible per task, out of
    the node's `SLURM_STEP_GPUS`/`SLURM_JOB_GPUS`), that one GPU. More processes on a node than GPUs is refused
    here, in one line, rather than left to NCCL, which fails later with "duplicate GPU"."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RecipeError("engine.device: 'cuda' asked for, but torch sees no CUDA device; use auto or cpu")
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        visible = torch.cuda.device_count()
        if process.local_rank < visible:
            return torch.device("cuda", process.local_rank)
        node_gpus = _slurm_node_gpus(os.environ if environ is None else environ) if process.launcher == "slurm" else 0
        if visible == 1 and process.local_rank < node_gpus:
            return torch.device("cuda", 0)  # SLURM gave this task its own GPU out of the node's
        raise RecipeError(f"engine.device: process {process.rank} is local rank {process.local_rank} on its node "
                          f"but sees {visible} GPU(s) ({process.launcher}): two processes would share a GPU, which "
                          "NCCL refuses; start at most one process per GPU (torchrun --nproc_per_node, srun "
                          "--ntasks-per-node) or set engine.device: cpu")
    if cfg.precision == "fp16":
        raise RecipeError("engine.precision: fp16 needs a CUDA device; on the CPU use fp32 or bf16")
    return torch.device("cpu")


def _slurm_node_gpus(environ) -> int:
    """GPUs SLURM allocated to this node's tasks (`SLURM_STEP_GPUS` or `SLURM_JOB_GPUS`, e.g. "0,1,2,3"), 0 if
    it names none."""
    listed = environ.get("SLURM_STEP_GPUS") or environ.get("SLURM_JOB_GPUS") or ""
    return len([g for g in listed.split(",") if g.strip()])


def configure_cuda(cfg: EngineConfig, device: torch.device) -> None:
    """The process-wide CUDA settings of `engine` (nothing on another device): cuDNN's autotuner for a run's fixed
    shapes (`engine.cudnn_benchmark`) and TF32 for fp32 matmuls and convolutions (`engine.tf32`)."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    torch.backends.cudnn.allow_tf32 = cfg.tf32


def build_optimizer(cfg: OptimConfig, model: nn.Module, fused: bool = False) -> torch.optim.Optimizer:
    """The recipe's optimizer over every trainable parameter (thresholds, BN and biases included, one weight
    decay: DSR.md section 5). `fused`: torch's fused implementation (one kernel for all parameters), used only
    where every parameter is on a CUDA device (the values are those of the for-each one, to round-off)."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and fused and all(p.is_cuda for p in params)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay, fused=fused or None)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
