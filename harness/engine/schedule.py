"""Learning-rate schedule of DSR.md section 5: cosine over epochs, linear warm-up by iterations.

Multiplier of the base learning rate at global iteration i (0-based), epoch e = i // iters_per_epoch:
  warm-up  w(i) = min(1, (i + 1) / warmup_iters)           (1 when warmup_iters = 0)
  cosine   c(e) = 0.5 * (1 + cos(pi * e / epochs))          ("constant": c = 1)
  lr(i)    = base_lr * w(i) * c(e)
The scheduler is stepped once per iteration.
"""

import math

import torch


def lr_multiplier(iteration: int, iters_per_epoch: int, epochs: int, warmup_iters: int, schedule: str) -> float:
    warm = min(1.0, (iteration + 1) / warmup_iters) if warmup_iters > 0 else 1.0
    if schedule == "constant":
        return warm
    epoch = iteration // iters_per_epoch
    return warm * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def build_scheduler(optimizer: torch.optim.Optimizer, iters_per_epoch: int, epochs: int, warmup_iters: int,
                    schedule: str) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: lr_multiplier(i, iters_per_epoch, epochs, warmup_iters, schedule))
