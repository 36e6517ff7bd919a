"""The plain DSR neuron: the reference every fused kernel must reproduce, and the fallback (DSR.md sections 1-3).

All tensors time-merged, time-major: `x`, `spikes`, `grad_out`, `grad_x` are `[T*B, ...]` (viewed `[T, N]`),
representations `[B, ...]` (`[N]`). Arithmetic in the accumulation dtype `acc` (float32 for fp32/bf16/fp16
inputs, float64 for float64), spikes and input gradients in the input dtype. The constants are 0-dim tensors
in `acc`, computed once per call by the caller (`harness.snn.kernels`) so that every implementation compares
and writes the same values:  threshold = alpha*V,  amp = V/dt (LIF output amplitude).

Forward, u_0 = 0, per element, t = 0..T-1, each operation rounded to `acc` in this order (no fused
multiply-add: a kernel must reproduce these roundings to give the same spikes):
  IF:  S += x_t;           u += x_t;                          f = u >= threshold;  u -= f*V;  y_t = f*V
  LIF: S += w_t*x_t;       u = u*beta;  u = u + x_t*(1-beta);  f = u >= threshold;  u -= f*V;  y_t = f*amp
(f is 0 or 1 in `acc`, so f*V is exactly V or 0.)
returning `(y, S/T)` (IF: xbar) or `(y, S/W)` (LIF: xhat, W = sum_t w_t given as the 0-dim tensor `w_sum`).
Backward, with g_t the upstream gradient:
  IF:  G = sum_t g_t;              dx_t = (G/T) * 1[0 <= xbar <= V];             above = G * 1[xbar > V]
  LIF: G = T * sum_t w_t g_t / W;  dx_t = (G/(tau*T)) * 1[0 < xhat < V*tau/dt];   above = G * 1[xhat > V*tau/dt]
returning `(dx, above)`; the caller sums `above` into the threshold gradient. G is accumulated in `acc` while
g is read in its own dtype (no `acc` copy of the `[T*B, ...]` gradient under bf16/fp16), and dx_t is cast to the
input dtype before it is expanded over the T steps.
"""

import torch
from torch import Tensor

from harness.snn.neuron import accumulation_dtype
from harness.snn.time import fold_time, unfold_time


def _time_loop(x: Tensor, v: Tensor, threshold: Tensor, amp: Tensor, T: int, integrate) -> tuple[Tensor, Tensor]:
    """The loop both neurons share: `integrate(u, S, x_t, t)` updates the potential and the input sum in place,
    then f = u >= threshold, u -= f*V, y_t = f*amp. Returns `(y, S)`."""
    steps = unfold_time(x, T)
    acc = accumulation_dtype(x)
    u = torch.zeros_like(steps[0], dtype=acc)
    total = torch.zeros_like(u)
    out = torch.empty_like(steps)
    for t in range(T):
        integrate(u, total, steps[t].to(acc), t)
        fired = (u >= threshold).to(acc)
        u -= fired * v
        out[t] = fired * amp
    return fold_time(out), total


def if_forward(x: Tensor, v: Tensor, threshold: Tensor, T: int) -> tuple[Tensor, Tensor]:
    def integrate(u: Tensor, total: Tensor, x_t: Tensor, t: int) -> None:
        total += x_t
        u += x_t

    out, input_sum = _time_loop(x, v, threshold, v, T, integrate)
    return out, input_sum / T


def lif_forward(x: Tensor, v: Tensor, threshold: Tensor, amp: Tensor, w: Tensor, w_sum: Tensor, T: int, beta: float,
                decay: float) -> tuple[Tensor, Tensor]:
    """`w`: the decoding weights `[T]` in `acc`, `w_sum` their sum (0-dim); `decay` = 1 - beta."""
    def integrate(u: Tensor, total: Tensor, x_t: Tensor, t: int) -> None:
        total += w[t] * x_t
        u.mul_(beta)
        u += x_t * decay

    out, weighted_input = _time_loop(x, v, threshold, amp, T, integrate)
    return out, weighted_input / w_sum


def if_backward(grad_out: Tensor, xbar: Tensor, v: Tensor, T: int) -> tuple[Tensor, Tensor]:
    G = unfold_time(grad_out, T).sum(dim=0, dtype=xbar.dtype)  # accumulated in acc: no acc copy of grad_out
    grad_step = ((G / T) * ((xbar >= 0) & (xbar <= v))).to(grad_out.dtype)
    return fold_time(grad_step.unsqueeze(0).expand(T, *grad_step.shape)), G * (xbar > v)


def lif_backward(grad_out: Tensor, xhat: Tensor, upper: Tensor, w: Tensor, T: int, tau: float,
                 w_sum: float) -> tuple[Tensor, Tensor]:
    """`upper` = V*tau/dt (0-dim, `acc`); `w_sum` = W."""
    steps = unfold_time(grad_out, T)
    G = torch.zeros_like(xhat)
    for t in range(T):  # sum_t w_t g_t, each step read in its dtype and accumulated in acc
        G.addcmul_(steps[t], w[t])
    G = T * G / w_sum
    grad_step = ((G / (tau * T)) * ((xhat > 0) & (xhat < upper))).to(grad_out.dtype)
    return fold_time(grad_step.unsqueeze(0).expand(T, *grad_step.shape)), G * (xhat > upper)
