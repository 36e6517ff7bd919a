"""Components of a run built from their recipe sections: the device, the optimizer, the global seed.

Each takes only its section (torchtitan style); `harness.engine.loop.Trainer` composes them.
"""

import random

import torch
from torch import nn

from harness.engine.distributed import ProcessInfo
from harness.recipe import EngineConfig, OptimConfig, RecipeError


def pick_device(cfg: EngineConfig, process: ProcessInfo) -> torch.device:
    """`engine.device` resolved for this process (auto: CUDA where torch sees it; rank r takes local GPU r)."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RecipeError("engine.device: 'cuda' asked for, but torch sees no CUDA device; use auto or cpu")
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", process.local_rank % max(1, torch.cuda.device_count()))
    if cfg.precision == "fp16":
        raise RecipeError("engine.precision: fp16 needs a CUDA device; on the CPU use fp32 or bf16")
    return torch.device("cpu")


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The recipe's optimizer over every trainable parameter (thresholds, BN and biases included, one weight
    decay: DSR.md section 5)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
