"""Spike statistics measured on real activations: the firing rate of every spiking layer.

Firing rate of a layer = (number of non-zero outputs over all steps, samples and units) /
(T * B * units), i.e. the fraction of (unit, step) pairs that spiked, in [0, 1]. `FiringRateMonitor`
accumulates these counts with forward hooks over as many batches as it watches.
"""

from collections import OrderedDict

import torch
from torch import nn

from harness.snn.neuron import SpikingNeuron


def spiking_layers(model: nn.Module) -> "OrderedDict[str, SpikingNeuron]":
    """Every spiking neuron module of `model`, by its qualified name."""
    return OrderedDict((name, m) for name, m in model.named_modules() if isinstance(m, SpikingNeuron))


class FiringRateMonitor:
    """Context manager: count spikes of every neuron of `model` while it runs.

    `rates()` -> {layer name: firing rate}; `mean_rate()` -> total spikes / total (unit, step) pairs.
    """

    def __init__(self, model: nn.Module):
        self.layers = spiking_layers(model)
        self.spikes = {name: 0 for name in self.layers}
        self.slots = {name: 0 for name in self.layers}
        self._handles: list = []

    def _hook(self, name: str):
        def count(_module, _inputs, output: torch.Tensor) -> None:
            self.spikes[name] += int(torch.count_nonzero(output))
            self.slots[name] += output.numel()
        return count

    def __enter__(self) -> "FiringRateMonitor":
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in self.layers.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def rates(self) -> dict[str, float]:
        return {name: self.spikes[name] / self.slots[name] for name in self.layers if self.slots[name]}

    def mean_rate(self) -> float:
        total = sum(self.slots.values())
        return sum(self.spikes.values()) / total if total else 0.0
