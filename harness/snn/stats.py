"""Spike statistics and efficiency measured on real activations: firing rates, synaptic operations, energy.

`FiringRateMonitor(model)` is a context manager that puts forward hooks on the model while it runs over
as many batches as it watches, and counts:

Firing rate of a spiking layer = (non-zero outputs over all steps, samples and units) / (T * B * units):
the fraction of (unit, step) pairs that spiked, in [0, 1]. `mean_rate()` pools every layer's counts.

Synaptic operations, per sample, from the inputs each synaptic layer (Conv1d/2d/3d, Linear) really got:
  - a layer that runs after a spiking neuron in the same forward is fed by spikes: every non-zero input
    element x_i (summed over the T steps of the merged `[T*B, ...]` batch) triggers one accumulate (AC)
    per synapse leaving it, so  ACs = sum_i 1[x_i != 0] * fanout_i,  where fanout_i counts the
    (output unit, output position) pairs x_i reaches (exact at the borders: `fanout` below);
  - a layer that runs before any neuron (the analog first layer under direct encoding) does dense
    multiply-accumulates (MACs) = output elements * (in_channels / groups) * kernel size (Linear:
    output elements * in_features), counted as executed: direct encoding runs it on all T steps.
  `sops_per_sample` = ACs / samples; `macs_per_sample` = MACs / samples.
The ANN on the same backbone does, per sample, the dense MACs of every synaptic layer for one step:
  `ann_macs_per_sample` = sum over layers of dense MACs / rows of the merged batch (T*B rows in the SNN,
  B in the ANN), so it is measured by the same hooks, on the same shapes.
Energy per sample, the estimate used in the SNN literature (45 nm, Horowitz 2014):
  E = MACs * e_MAC + ACs * e_AC,  e_MAC = 4.6 pJ, e_AC = 0.9 pJ by default (recipe `efficiency`);
  the ANN's: E_ANN = ann_MACs * e_MAC. Reported in microjoules (1 uJ = 1e6 pJ).
Not counted: bias additions, BatchNorm (foldable into the weights at inference), pooling, the neurons'
membrane updates. Average pooling between a neuron and a synaptic layer makes that layer's inputs
non-binary; they still count as spike-driven, one AC per non-zero input and synapse.
Counts accumulate as tensors on the model's device (no host synchronisation per batch); in a distributed
job `reduce(reduce_sum)` sums them over the processes, after which every statistic is that of the whole
validation set, the same whatever the number of processes.
"""

import math
from collections import OrderedDict

import torch
from torch import nn

from harness.snn.neuron import SpikingNeuron

MAC_PJ = 4.6  # energy of one 32-bit float multiply-accumulate at 45 nm, picojoules
AC_PJ = 0.9  # energy of one 32-bit float accumulate at 45 nm, picojoules
PJ_PER_UJ = 1e6

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def spiking_layers(model: nn.Module) -> "OrderedDict[str, SpikingNeuron]":
    """Every spiking neuron module of `model`, by its qualified name."""
    return OrderedDict((name, m) for name, m in model.named_modules() if isinstance(m, SpikingNeuron))


def synaptic_layers(model: nn.Module) -> "OrderedDict[str, nn.Module]":
    """Every Conv1d/2d/3d and Linear module of `model`, by its qualified name."""
    return OrderedDict((name, m) for name, m in model.named_modules() if isinstance(m, (*_CONVS, nn.Linear)))


def dense_macs(layer: nn.Module, output: torch.Tensor) -> int:
    """Multiply-accumulates of one dense call of `layer` that produced `output` (bias not counted)."""
    if isinstance(layer, nn.Linear):
        return output.numel() * layer.in_features
    return output.numel() * (layer.in_channels // layer.groups) * math.prod(layer.kernel_size)


def fanout(layer: nn.Module, input_shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Synapses leaving each element of one sample's input to `layer`, shape `input_shape` (no batch).

    Linear: `out_features` everywhere. Conv: with all weights 1 and no bias, d(sum of outputs)/dx_i is the
    number of (output channel, output position) pairs whose receptive field holds x_i, padding included.
    Only the layer's declared shape is read, never `layer.weight` itself: under DeepSpeed ZeRO-3 a forward
    hook runs after ZeRO has released the partitioned weight (an empty tensor by then).
    """
    if isinstance(layer, nn.Linear):
        return torch.full(input_shape, float(layer.out_features), dtype=torch.float64, device=device)
    with torch.enable_grad(), torch.autocast(device.type, enabled=False):
        probe = torch.zeros((1, *input_shape), device=device, requires_grad=True)
        ones = torch.ones((layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size), device=device)
        layer._conv_forward(probe, ones, None).sum().backward()
    return probe.grad[0].to(torch.float64)


class FiringRateMonitor:
    """Context manager: count spikes of every neuron and synaptic operations of every synaptic layer of
    `model` while it runs (see the module docstring for the definitions).

    `rates()` -> {layer name: firing rate}; `mean_rate()` -> total spikes / total (unit, step) pairs;
    `efficiency(mac_pj, ac_pj)` -> synaptic operations, MACs and energy per sample, the ANN's beside them.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = spiking_layers(model)
        self.synapses = synaptic_layers(model)
        # per neuron: spikes, (unit, step) slots; per synaptic layer: spike-driven ACs, MACs of analog-fed
        # calls, dense MACs of every call, rows of the merged batch of every call; then the sample count
        self.counts = torch.zeros(2 * len(self.layers) + 4 * len(self.synapses) + 1, dtype=torch.float64)
        self._slot = {name: i for i, name in enumerate([*self.layers, *self.synapses])}
        self._neuron_ran = False  # has a neuron run in the current forward of `model`?
        self._fanouts: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        self._handles: list = []

    def _view(self, start: int, rows: int, cols: int) -> torch.Tensor:
        return self.counts[start:start + rows * cols].view(rows, cols)

    @property
    def _neuron_counts(self) -> torch.Tensor:  # [layers, (spikes, slots)]
        return self._view(0, len(self.layers), 2)

    @property
    def _synapse_counts(self) -> torch.Tensor:  # [synapses, (ACs, MACs, dense MACs, rows)]
        return self._view(2 * len(self.layers), len(self.synapses), 4)

    def _start_forward(self, _module, inputs) -> None:
        x = inputs[0]
        if self.counts.device != x.device:
            self.counts = self.counts.to(x.device)
        self.counts[-1] += x.shape[0]
        self._neuron_ran = False

    def _hook(self, name: str):
        row = self._slot[name]

        def count(_module, _inputs, output: torch.Tensor) -> None:
            self._neuron_counts[row, 0] += torch.count_nonzero(output)
            self._neuron_counts[row, 1] += output.numel()
            self._neuron_ran = True
        return count

    def _synapse_hook(self, name: str):
        row = self._slot[name] - len(self.layers)

        def count(layer, inputs, output: torch.Tensor) -> None:
            x = inputs[0]
            counts = self._synapse_counts[row]
            macs = dense_macs(layer, output)
            counts[2] += macs
            counts[3] += x.shape[0]
            if not self._neuron_ran:
                counts[1] += macs
                return
            key = (name, tuple(x.shape[1:]))
            if key not in self._fanouts:
                self._fanouts[key] = fanout(layer, key[1], x.device)
            active = (x != 0).sum(dim=0, dtype=torch.float64)
            counts[0] += (active * self._fanouts[key]).sum()
        return count

    @property
    def samples(self) -> int:
        return round(self.counts[-1].item())

    @property
    def accumulates(self) -> dict[str, int]:
        """Spike-driven ACs per synaptic layer."""
        return dict(zip(self.synapses, (round(v) for v in self._synapse_counts[:, 0].tolist()), strict=True))

    @property
    def multiply_accumulates(self) -> dict[str, int]:
        """MACs of analog-fed calls per synaptic layer."""
        return dict(zip(self.synapses, (round(v) for v in self._synapse_counts[:, 1].tolist()), strict=True))

    def reduce(self, reduce_sum) -> None:
        """Replace the counts by `reduce_sum(counts)` (their sum over the processes of a job)."""
        self.counts = reduce_sum(self.counts)

    def __enter__(self) -> "FiringRateMonitor":
        self._handles = [self.model.register_forward_pre_hook(self._start_forward)]
        self._handles += [m.register_forward_hook(self._hook(name)) for name, m in self.layers.items()]
        self._handles += [m.register_forward_hook(self._synapse_hook(name)) for name, m in self.synapses.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def rates(self) -> dict[str, float]:
        spikes, slots = self._neuron_counts.cpu().unbind(1)
        return {name: spikes[i].item() / slots[i].item() for i, name in enumerate(self.layers) if slots[i]}

    def mean_rate(self) -> float:
        spikes, slots = self._neuron_counts.cpu().sum(0).tolist()
        return spikes / slots if slots else 0.0

    def efficiency(self, mac_pj: float = MAC_PJ, ac_pj: float = AC_PJ) -> dict[str, float]:
        """Per-sample synaptic operations and energy (uJ) of the watched batches; {} if none ran."""
        samples = self.samples
        if not samples:
            return {}
        synapses = self._synapse_counts.cpu()
        sops = round(synapses[:, 0].sum().item()) / samples
        macs = synapses[:, 1].sum().item() / samples
        called = synapses[:, 3] > 0
        ann_macs = (synapses[called, 2] / synapses[called, 3]).sum().item()
        return {
            "efficiency/sops_per_sample": sops,
            "efficiency/macs_per_sample": macs,
            "efficiency/energy_uj": (macs * mac_pj + sops * ac_pj) / PJ_PER_UJ,
            "efficiency/ann_macs_per_sample": ann_macs,
            "efficiency/ann_energy_uj": ann_macs * mac_pj / PJ_PER_UJ,
        }
