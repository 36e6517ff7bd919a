"""Surrogate-gradient neurons: 0/1 spikes, trained by backpropagation through time (the `sg` baseline).

On time-merged input `[T*B, ...]`, with u_0 = 0 per sample, threshold V and leak lambda in (0, 1]:
  u_t = leak * u_{t-1} + x_t             (IF: leak = 1; LIF as in TET's code, leak 0.5)
  s_t = H(u_t - V)                       H(x) = 1[x >= 0] forward, a surrogate h(x) backward (surrogate.py)
  hard reset: u_t = u_t * (1 - s_t)      (to 0, as STBP and TET)
  soft reset: u_t = u_t - V * s_t        (by subtraction)
With `detach_reset` the s_t inside the reset is detached (no gradient through the reset path). The time
loop is plain autograd, so the backward is BPTT through u. The output is the 0/1 spikes; the layer's
representation is their rate (the `SpikingNeuron` default).
"""

from typing import Literal

import torch
from torch import Tensor

from harness.snn.coding import check_positive
from harness.snn.neuron import SpikingNeuron, accumulation_dtype
from harness.snn.surrogate import spike, surrogate_derivative
from harness.snn.time import unfold_time

RESETS = ("hard", "soft")


class SGLIF(SpikingNeuron):
    """Leaky integrate-and-fire neuron with 0/1 spikes and a surrogate gradient.

    Args:
        T: time steps merged into the batch, input `[T*B, ...]`.
        vth: threshold V (> 0, fixed).
        leak: membrane decay per step in (0, 1]; 1 is IF.
        reset: "hard" (to 0) or "soft" (subtract V).
        detach_reset: no gradient through the spike in the reset.
        surrogate: "rectangular", "triangle" or "arctan".
        width: surrogate width (rectangular, triangle).
        slope: surrogate slope (arctan).
    """

    def __init__(self, T: int, vth: float = 1.0, leak: float = 0.5, reset: Literal["hard", "soft"] = "hard",
                 detach_reset: bool = False, surrogate: str = "triangle", width: float = 1.0, slope: float = 2.0):
        super().__init__(T)
        self.vth = check_positive("vth", vth)
        if not isinstance(leak, (int, float)) or not 0 < leak <= 1:
            raise ValueError(f"leak must be in (0, 1] (membrane decay per step), got {leak!r}")
        if reset not in RESETS:
            raise ValueError(f"reset must be one of {RESETS}, got {reset!r}")
        self.leak = float(leak)
        self.reset = reset
        self.detach_reset = bool(detach_reset)
        self.surrogate = surrogate
        width, slope = check_positive("width", width), check_positive("slope", slope)
        self.derivative = surrogate_derivative(surrogate, width, slope)

    def forward(self, x: Tensor) -> Tensor:
        steps = unfold_time(x, self.T)
        u = torch.zeros_like(steps[0], dtype=accumulation_dtype(x))
        out = []
        for t in range(self.T):
            u = self.leak * u + steps[t]
            s = spike(u - self.vth, self.derivative)
            r = s.detach() if self.detach_reset else s
            u = u * (1 - r) if self.reset == "hard" else u - self.vth * r
            out.append(s)
        return torch.cat(out).to(x.dtype)  # time-major [T*B, ...], in the layout of the steps (channels-last kept)

    def extra_repr(self) -> str:
        return (f"T={self.T}, vth={self.vth}, leak={self.leak}, reset={self.reset}, "
                f"detach_reset={self.detach_reset}, surrogate={self.surrogate}")


class SGIF(SGLIF):
    """Integrate-and-fire neuron with 0/1 spikes and a surrogate gradient: `SGLIF` with leak = 1."""

    def __init__(self, T: int, vth: float = 1.0, reset: Literal["hard", "soft"] = "hard", detach_reset: bool = False,
                 surrogate: str = "triangle", width: float = 1.0, slope: float = 2.0):
        super().__init__(T, vth, 1.0, reset, detach_reset, surrogate, width, slope)
