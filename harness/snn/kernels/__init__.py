"""Which implementation of the DSR neuron's time loop runs: the plain reference or a fused kernel.

`reference.py` is the plain PyTorch loop (several elementwise passes over memory per time step) and states the
math. The fused kernels run the whole loop in one pass, reading the input once and writing the spikes once,
plus the `[B, ...]` representation the backward keeps; the backward reads the upstream gradient once and
writes the input gradient once:
  - CPU: a C++ extension (`csrc/dsr_neuron.cpp`, built with the machine's compiler the first time it is used
    and cached by torch; `python -m harness.snn.kernels` builds it ahead, as `make install` does);
  - CUDA: Triton kernels (`triton_neuron.py`).
Both reproduce the reference's roundings: on the same device and dtype the spikes are bit-identical, the
representations too, and the gradients agree to float round-off (the sums over T run in another order).

The choice is process-wide (`select`; the trainer sets it from `engine.neuron_kernel`): `plain`, `fused`
(refused with one line where no fused kernel can run), or `auto` (the default): fused where it can run,
the plain loop otherwise (float64 on CUDA, no compiler, no Triton). The fused kernels are torch custom
operators (`torch.ops.harness_dsr.*`) with shape functions, so `torch.compile` traces through them.
"""

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from harness.errors import HarnessError
from harness.snn.kernels import reference
from harness.snn.neuron import accumulation_dtype

KERNEL_CHOICES = ("auto", "plain", "fused")
log = logging.getLogger(__name__)


class KernelError(HarnessError):
    """The fused neuron was asked for where it cannot run."""


_choice = "auto"
_status: dict[str, tuple[bool, str]] = {}  # device type -> (available, why not)
_warned: set[str] = set()  # device types whose fallback to the plain loop was reported


def select(choice: str) -> None:
    """Use `choice` (one of KERNEL_CHOICES) from now on in this process."""
    global _choice
    if choice not in KERNEL_CHOICES:
        raise KernelError(f"engine.neuron_kernel: {choice!r} is not one of {', '.join(KERNEL_CHOICES)}")
    _choice = choice


def selected() -> str:
    return _choice


@contextmanager
def using(choice: str) -> Iterator[None]:
    """`select(choice)` for the block, then the previous choice again."""
    before = _choice
    select(choice)
    try:
        yield
    finally:
        select(before)


def fused_status(device_type: str) -> tuple[bool, str]:
    """`(available, reason if not)` for the fused kernel on `device_type` ('cpu', 'cuda'); tried once."""
    if device_type not in _status:
        _status[device_type] = _probe(device_type)
    return _status[device_type]


def _probe(device_type: str) -> tuple[bool, str]:
    if device_type == "cpu":
        from harness.snn.kernels import cpu_extension

        return cpu_extension.status()
    if device_type == "cuda":
        try:
            from harness.snn.kernels import triton_neuron  # noqa: F401
        except ImportError as e:  # pragma: no cover  (torch's CUDA wheels ship Triton)
            return False, f"Triton is not importable ({e})"
        return True, ""
    return False, f"no fused kernel for device type {device_type!r}"


def check_selected(device_type: str) -> None:
    """Raise `KernelError` (one line) when `fused` is selected and cannot run on `device_type`; otherwise try the
    fused kernel now (an `auto` choice builds the CPU extension here, before any step, not inside a compiled one)."""
    available, reason = fused_status(device_type)
    if _choice == "fused" and not available:
        raise KernelError(f"engine.neuron_kernel: fused cannot run on {device_type}: {reason}; use auto or plain")
    if _choice == "auto" and not available and device_type not in _warned:
        _warned.add(device_type)
        log.warning("the fused DSR neuron cannot run on %s (%s); the plain loop runs instead (same spikes, slower)",
                    device_type, reason)


@torch.compiler.assume_constant_result  # torch.compile evaluates it once, while tracing, instead of tracing it
def _fused_available(device_type: str) -> bool:
    return fused_status(device_type)[0]


def _fused(x: Tensor) -> bool:
    if _choice == "plain" or (x.device.type == "cuda" and x.dtype == torch.float64):
        return False
    if not _fused_available(x.device.type):
        check_selected(x.device.type)  # raises when fused was asked for
        return False
    return True


def _backend(device_type: str):
    if device_type == "cuda":
        from harness.snn.kernels import triton_neuron

        return triton_neuron
    from harness.snn.kernels import cpu_extension

    return cpu_extension.load()


# ------------------------------------------------------------------------------------------ custom operators
def _dense(x: Tensor) -> Tensor:
    """`x` itself if it is contiguous or channels-last (the kernels keep that layout: a unit's element sits at the
    same offset in every time step and in the representation), else a contiguous copy."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    return x.contiguous()


def _like(grad: Tensor, rep: Tensor) -> Tensor:
    """`grad` (`[T*B, ...]`) in the layout of the representation `rep` (`[B, ...]`) the forward wrote."""
    channels_last = rep.dim() == 4 and not rep.is_contiguous() and rep.is_contiguous(memory_format=torch.channels_last)
    return grad.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _fused_if_forward(x: Tensor, v: Tensor, threshold: Tensor, T: int) -> tuple[Tensor, Tensor]:
    return tuple(_backend(x.device.type).if_forward(_dense(x), v, threshold, T))


def _fused_lif_forward(x: Tensor, v: Tensor, threshold: Tensor, amp: Tensor, w: Tensor, w_sum: Tensor, T: int,
                       beta: float, decay: float) -> tuple[Tensor, Tensor]:
    return tuple(_backend(x.device.type).lif_forward(_dense(x), v, threshold, amp, w, w_sum, T, beta, decay))


def _fused_if_backward(grad_out: Tensor, xbar: Tensor, v: Tensor, T: int) -> tuple[Tensor, Tensor]:
    return tuple(_backend(grad_out.device.type).if_backward(_like(grad_out, xbar), xbar, v, T))


def _fused_lif_backward(grad_out: Tensor, xhat: Tensor, upper: Tensor, w: Tensor, T: int, tau: float,
                        w_sum: float) -> tuple[Tensor, Tensor]:
    return tuple(_backend(grad_out.device.type).lif_backward(_like(grad_out, xhat), xhat, upper, w, T, tau, w_sum))


# The same functions as operators with shape functions, for torch.compile to trace through (eagerly they are called
# directly: an operator's Python dispatch costs about 50 us a call, which a small layer feels).
_if_forward_op = torch.library.custom_op("harness_dsr::if_forward", _fused_if_forward, mutates_args=())
_lif_forward_op = torch.library.custom_op("harness_dsr::lif_forward", _fused_lif_forward, mutates_args=())
_if_backward_op = torch.library.custom_op("harness_dsr::if_backward", _fused_if_backward, mutates_args=())
_lif_backward_op = torch.library.custom_op("harness_dsr::lif_backward", _fused_lif_backward, mutates_args=())


@_if_forward_op.register_fake
def _(x, v, threshold, T):
    return torch.empty_like(x), torch.empty_like(x[: x.shape[0] // T], dtype=accumulation_dtype(x))


@_lif_forward_op.register_fake
def _(x, v, threshold, amp, w, w_sum, T, beta, decay):
    return torch.empty_like(x), torch.empty_like(x[: x.shape[0] // T], dtype=accumulation_dtype(x))


@_if_backward_op.register_fake
def _(grad_out, xbar, v, T):
    return torch.empty_like(grad_out), torch.empty_like(xbar)


@_lif_backward_op.register_fake
def _(grad_out, xhat, upper, w, T, tau, w_sum):
    return torch.empty_like(grad_out), torch.empty_like(xhat)


# ------------------------------------------------------------------------------------------ the entry points
def _run(op, fused, plain, x: Tensor, *args):
    if not _fused(x):
        return plain(x, *args)
    return op(x, *args) if torch.compiler.is_compiling() else fused(x, *args)


def if_forward(x: Tensor, v: Tensor, threshold: Tensor, T: int) -> tuple[Tensor, Tensor]:
    """`(spikes [T*B, ...], xbar [B, ...])`; see `reference.if_forward`."""
    return _run(_if_forward_op, _fused_if_forward, reference.if_forward, x, v, threshold, T)


def lif_forward(x: Tensor, v: Tensor, threshold: Tensor, amp: Tensor, w: Tensor, w_sum: Tensor, T: int, beta: float,
                decay: float) -> tuple[Tensor, Tensor]:
    """`(outputs [T*B, ...], xhat [B, ...])`; see `reference.lif_forward`."""
    return _run(_lif_forward_op, _fused_lif_forward, reference.lif_forward, x, v, threshold, amp, w, w_sum, T, beta,
                decay)


def if_backward(grad_out: Tensor, xbar: Tensor, v: Tensor, T: int) -> tuple[Tensor, Tensor]:
    """`(grad_x, G * 1[xbar > V])`; see `reference.if_backward`."""
    return _run(_if_backward_op, _fused_if_backward, reference.if_backward, grad_out, xbar, v, T)


def lif_backward(grad_out: Tensor, xhat: Tensor, upper: Tensor, w: Tensor, T: int, tau: float,
                 w_sum: float) -> tuple[Tensor, Tensor]:
    """`(grad_x, G * 1[xhat > V*tau/dt])`; see `reference.lif_backward`."""
    return _run(_lif_backward_op, _fused_lif_backward, reference.lif_backward, grad_out, xhat, upper, w, T, tau,
                w_sum)
