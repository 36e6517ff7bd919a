"""Surrogate spike functions: the Heaviside step forward, a smooth stand-in for its derivative backward.

For `x = u - V` (membrane potential minus threshold) the forward is the spike `H(x) = 1[x >= 0]` (0/1);
the backward replaces the Dirac delta dH/dx by `h(x)`:
  rectangular (STBP, Wu et al. 2018):  h(x) = (1/width) * 1[|x| < width/2]
  triangle    (TET's code, Deng 2022): h(x) = (1/width^2) * max(0, width - |x|)
  arctan      (SpikingJelly's ATan):    h(x) = (slope/2) / (1 + (pi/2 * slope * x)^2)
Each `h` integrates to 1 over the real line, so every surrogate is a smoothed unit step.
`SURROGATES` maps a recipe's `surrogate.name` to its `h`; `spike(x, h)` applies it.
"""

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor


def rectangular(x: Tensor, width: float = 1.0) -> Tensor:
    """STBP's rectangular window: 1/width inside |x| < width/2, 0 outside."""
    return (x.abs() < width / 2).to(x.dtype) / width


def triangle(x: Tensor, width: float = 1.0) -> Tensor:
    """TET's triangle (its `ZIF`, gamma = width): (1/width^2) * max(0, width - |x|)."""
    return (width - x.abs()).clamp(min=0) / width**2


def arctan(x: Tensor, slope: float = 2.0) -> Tensor:
    """Derivative of (1/pi) * arctan(pi/2 * slope * x) + 1/2."""
    return (slope / 2) / (1 + (math.pi / 2 * slope * x) ** 2)


SURROGATES: dict[str, Callable[..., Tensor]] = {"rectangular": rectangular, "triangle": triangle, "arctan": arctan}


def surrogate_derivative(name: str, width: float = 1.0, slope: float = 2.0) -> Callable[[Tensor], Tensor]:
    """`h` of surrogate `name` with its shape parameter bound (width for rectangular/triangle, slope for arctan)."""
    if name not in SURROGATES:
        raise ValueError(f"surrogate must be one of {', '.join(SURROGATES)}, got {name!r}")
    return partial(SURROGATES[name], slope=slope) if name == "arctan" else partial(SURROGATES[name], width=width)


class _Spike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, derivative: Callable[[Tensor], Tensor]) -> Tensor:
        ctx.save_for_backward(x)
        ctx.derivative = derivative
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (x,) = ctx.saved_tensors
        return grad_out * ctx.derivative(x), None


def spike(x: Tensor, derivative: Callable[[Tensor], Tensor]) -> Tensor:
    """`1[x >= 0]` forward; `grad * derivative(x)` backward."""
    return _Spike.apply(x, derivative)
