"""The base class every spiking neuron of the harness derives from.

A neuron is an `nn.Module` on time-merged, time-major input `[T*B, ...]` (DESIGN.md "Conventions") that
returns spikes of the same shape and knows how to decode its own output into a `[B, ...]`
representation (`decode`). Statistics (firing rates) and `spikify` find neurons by this class.
A neuron whose parameters must stay in a range (DSR's threshold, V >= V_bound) lists them in
`parameter_bounds`; every engine clamps them after each optimizer step (harness/engine/engines/base.py).
"""

import torch
from torch import Tensor, nn

from harness.snn.coding import rate
from harness.snn.time import check_time_steps


def accumulation_dtype(x: Tensor) -> torch.dtype:
    """The dtype a neuron integrates in: at least float32 whatever `x`'s (bf16 over many steps would lose small
    inputs)."""
    return torch.promote_types(x.dtype, torch.float32)


class SpikingNeuron(nn.Module):
    """A spiking layer over `T` time steps merged into the batch dimension.

    Args:
        T: time steps (>= 1).
    """

    def __init__(self, T: int):
        super().__init__()
        self.T = check_time_steps(T)

    def decode(self, y: Tensor) -> Tensor:
        """Representation of this neuron's output `[T*B, ...]` as `[B, ...]` (default: the rate)."""
        return rate(y, self.T)

    def parameter_bounds(self) -> list[tuple[nn.Parameter, float]]:
        """`(parameter, lower bound)` pairs the training engine must enforce after each optimizer step."""
        return []


def parameter_bounds(model: nn.Module) -> list[tuple[nn.Parameter, float]]:
    """Every bounded parameter of `model`'s spiking neurons with its lower bound."""
    return [pair for m in model.modules() if isinstance(m, SpikingNeuron) for pair in m.parameter_bounds()]
