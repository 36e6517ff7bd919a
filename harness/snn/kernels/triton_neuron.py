"""The fused DSR neuron on CUDA: Triton kernels, one program per block of `BLOCK` elements running all T steps.

Contract and math: `harness.snn.kernels.reference`, which these reproduce: the same operations rounded in the same
order in the accumulation dtype (`enable_fp_fusion=False`: no multiply-add is contracted, which would move the LIF
potential by an ulp and flip a spike at the threshold). The constants (V, alpha*V, V/dt) are read from device
tensors inside the kernels: no host synchronisation. Tensors arrive dense, in the layout `harness.snn.kernels`
chose. Each element's input is read once and its spikes written once; the backward reads the upstream gradient once
and writes the input gradient once.

With `TRITON_INTERPRET=1` the kernels run on CPU tensors (the tests check them so, without a GPU).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from harness.snn.neuron import accumulation_dtype

BLOCK = 1024


def _acc(x: Tensor):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _grid(n: int):
    return (triton.cdiv(n, BLOCK),)


# IF (`LEAKY` false: S += x_t, u += x_t; amp = V) or LIF (S += w_t*x_t, u = u*beta, u = u + x_t*decay); then
# f = u >= alpha*V, u -= f*V, y_t = f*amp. Writes y and S.
@triton.jit
def _forward_kernel(x_ptr, out_ptr, sum_ptr, w_ptr, v_ptr, th_ptr, amp_ptr, beta, decay, T, N,
                    LEAKY: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    v = tl.load(v_ptr).to(ACC)
    th = tl.load(th_ptr).to(ACC)
    amp = tl.load(amp_ptr).to(ACC)
    u = tl.zeros([BLOCK], ACC)
    s = tl.zeros([BLOCK], ACC)
    for t in range(T):
        base = t * N
        xi = tl.load(x_ptr + base + offs, mask=mask, other=0).to(ACC)
        if LEAKY:
            s += tl.load(w_ptr + t).to(ACC) * xi
            u = u * beta
            u = u + xi * decay
        else:
            s += xi
            u += xi
        fired = (u >= th).to(ACC)
        u -= fired * v
        tl.store(out_ptr + base + offs, (fired * amp).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(sum_ptr + offs, s, mask=mask)


@triton.jit
def _backward_kernel(g_ptr, rep_ptr, dx_ptr, above_ptr, w_ptr, upper_ptr, w_div, dx_div, T, N,
                     LEAKY: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    upper = tl.load(upper_ptr).to(ACC)
    G = tl.zeros([BLOCK], ACC)
    for t in range(T):
        g = tl.load(g_ptr + t * N + offs, mask=mask, other=0).to(ACC)
        if LEAKY:
            G += tl.load(w_ptr + t).to(ACC) * g
        else:
            G += g
    r = tl.load(rep_ptr + offs, mask=mask, other=0)
    if LEAKY:
        G = T * G / w_div
        in_range = (r > 0) & (r < upper)
    else:
        in_range = (r >= 0) & (r <= upper)
    tl.store(above_ptr + offs, G * (r > upper).to(ACC), mask=mask)
    dx = (G / dx_div * in_range.to(ACC)).to(dx_ptr.dtype.element_ty)
    for t in range(T):
        tl.store(dx_ptr + t * N + offs, dx, mask=mask)


def _rep_like(x: Tensor, T: int) -> Tensor:
    """`[B, ...]` in the accumulation dtype, in x's memory layout."""
    return torch.empty_like(x[: x.shape[0] // T], dtype=accumulation_dtype(x))


def if_forward(x: Tensor, v: Tensor, threshold: Tensor, T: int) -> tuple[Tensor, Tensor]:
    out, input_sum = torch.empty_like(x), _rep_like(x, T)
    n = input_sum.numel()
    _forward_kernel[_grid(n)](x, out, input_sum, v, v, threshold, v, 1.0, 0.0, T, n, LEAKY=False, ACC=_acc(x),
                              BLOCK=BLOCK, enable_fp_fusion=False)
    return out, input_sum / T  # torch's own division, as the plain loop's (CUDA divides by a scalar as a * (1/T))


def lif_forward(x: Tensor, v: Tensor, threshold: Tensor, amp: Tensor, w: Tensor, w_sum: Tensor, T: int, beta: float,
                decay: float) -> tuple[Tensor, Tensor]:
    out, weighted_input = torch.empty_like(x), _rep_like(x, T)
    n = weighted_input.numel()
    _forward_kernel[_grid(n)](x, out, weighted_input, w.contiguous(), v, threshold, amp, beta, decay, T, n,
                              LEAKY=True, ACC=_acc(x), BLOCK=BLOCK, enable_fp_fusion=False)
    return out, weighted_input / w_sum


def if_backward(grad_out: Tensor, xbar: Tensor, v: Tensor, T: int) -> tuple[Tensor, Tensor]:
    grad_x, above = torch.empty_like(grad_out), torch.empty_like(xbar)
    n = xbar.numel()
    _backward_kernel[_grid(n)](grad_out, xbar, grad_x, above, v, v, 1.0, float(T), T, n, LEAKY=False,
                               ACC=_acc(xbar), BLOCK=BLOCK, enable_fp_fusion=False)
    return grad_x, above


def lif_backward(grad_out: Tensor, xhat: Tensor, upper: Tensor, w: Tensor, T: int, tau: float,
                 w_sum: float) -> tuple[Tensor, Tensor]:
    grad_x, above = torch.empty_like(grad_out), torch.empty_like(xhat)
    n = xhat.numel()
    _backward_kernel[_grid(n)](grad_out, xhat, grad_x, above, w.contiguous(), upper, w_sum, tau * T, T, n,
                               LEAKY=True, ACC=_acc(xhat), BLOCK=BLOCK, enable_fp_fusion=False)
    return grad_x, above
