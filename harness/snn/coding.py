"""Spike representations (decoding), DSR.md section 2.

IF:  rate           a = (1/T) * sum_t y_t
LIF: weighted rate  a = sum_t w_t y_t / sum_t w_t,  w_t = exp(-(T-t)*dt/tau), t = 1..T (last weight 1)
Both take time-merged `[T*B, ...]` input and return `[B, ...]`.
"""

import math

import torch

from harness.snn.time import check_time_steps, unfold_time


def check_positive(name: str, value: float) -> float:
    """Return `value` if it is a finite number > 0, else raise ValueError naming it."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def decoding_weights(T: int, tau: float, dt: float, device=None, dtype=None) -> torch.Tensor:
    """`w_t = exp(-(T-t)*dt/tau)` for t = 1..T, shape `[T]`: increasing, last weight exactly 1."""
    check_time_steps(T)
    check_positive("tau", tau)
    check_positive("dt", dt)
    steps_to_end = torch.arange(T - 1, -1, -1, device=device, dtype=torch.float64)
    return torch.exp(-steps_to_end * (dt / tau)).to(dtype or torch.get_default_dtype())


def rate(y: torch.Tensor, T: int) -> torch.Tensor:
    """Mean over time of a `[T*B, ...]` tensor: `[B, ...]`."""
    return unfold_time(y, T).mean(dim=0)


def weighted_rate(y: torch.Tensor, T: int, tau: float, dt: float) -> torch.Tensor:
    """Exponentially weighted mean over time of a `[T*B, ...]` tensor: `[B, ...]`."""
    steps = unfold_time(y, T)
    w = decoding_weights(T, tau, dt, device=y.device, dtype=y.dtype)
    return torch.tensordot(w, steps, dims=([0], [0])) / w.sum()
