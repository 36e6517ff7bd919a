"""ANN -> SNN conversion (QCFS) and threshold calibration from ANN activations (DSR.md section 4).

QCFS -> IF (Bu et al., ICLR 2022): each QCFS activation with clip lambda becomes a `ConversionIF`:
  u_0 = lambda/2;  u_t = u_{t-1} + x_t;  s_t = lambda * 1[u_t >= lambda];  u_t = u_t - s_t   (soft reset)
For a constant input z and T = L its rate (1/T) sum_t s_t = lambda*floor(T z/lambda + 1/2)/T clipped to
[0, lambda], i.e. exactly QCFS(z). The converted network is the QCFS ANN's `SpikingNet`: direct encoding,
rate decoding, the same module names under `body.`. Only inference: the neuron has no useful gradient.

Calibration (DSR's hybrid start): `activation_percentiles(ann, batches, p)` is, for every activation
module of the ANN (post-ReLU output), the p-th percentile of all its output elements over the batches,
with the linear interpolation of `torch.quantile`: sorted values v_0 <= ... <= v_{N-1}, position
q = (p/100)(N-1), result v_lo + (q - lo)(v_hi - v_lo), lo = floor(q), hi = min(lo + 1, N - 1). It is
computed exactly in O(N(1 - p/100)) memory per layer by keeping only the values at and above v_lo.
`set_thresholds(snn, percentiles, scale)` sets each neuron's `vth` to percentile * scale (scale = dt for
DSR LIF: its representation reaches V/dt, DSR.md section 2), matching ANN activation `name` with neuron
`body.name`.
"""

import copy
import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from harness.snn.coding import rate
from harness.snn.neuron import SpikingNeuron, accumulation_dtype
from harness.snn.qcfs import QCFS
from harness.snn.spikify import SpikingNet, is_activation, replace_activations
from harness.snn.time import fold_time, unfold_time


class ConversionIF(SpikingNeuron):
    """IF neuron of a converted QCFS layer: threshold and spike amplitude `vth`, u_0 = vth/2, soft reset.

    Args:
        T: time steps merged into the batch, input `[T*B, ...]`.
        vth: threshold (the QCFS layer's lambda), kept as an fp32 buffer; given as a tensor, on its device (the
            converted network stays on the ANN's device, buffers included, with no host read of lambda).
    """

    def __init__(self, T: int, vth: float | Tensor):
        super().__init__(T)
        vth = vth.detach().to(torch.float32).clone() if isinstance(vth, Tensor) else torch.tensor(float(vth))
        self.register_buffer("vth", vth.reshape(()))

    def forward(self, x: Tensor) -> Tensor:
        steps = unfold_time(x, self.T)
        v = self.vth.to(accumulation_dtype(x))
        u = torch.full_like(steps[0], 0.5, dtype=v.dtype) * v
        out = torch.empty_like(steps)
        for t in range(self.T):
            u = u + steps[t]
            spike = (u >= v).to(v.dtype) * v
            u = u - spike
            out[t] = spike
        return fold_time(out)

    def extra_repr(self) -> str:
        return f"T={self.T}, vth={'?' if self.vth.is_meta else format(self.vth.item(), '.4g')}"


def _conversion_neuron(T: int):
    def make(activation: nn.Module) -> nn.Module:
        if not isinstance(activation, QCFS):
            raise ValueError(f"convert_qcfs: every activation must be QCFS, found {type(activation).__name__}")
        return ConversionIF(T, activation.lam)
    return make


def convert_qcfs(ann: nn.Module, T: int) -> SpikingNet:
    """The SNN of a QCFS-trained ANN at `T` steps (`ann` is left untouched)."""
    body = copy.deepcopy(ann)
    if replace_activations(body, _conversion_neuron(T)) == 0:
        raise ValueError(f"convert_qcfs found no QCFS activation in {type(ann).__name__}")
    return SpikingNet(body, T, lambda y: rate(y, T))


def _upper_tail_size(total: int, q: float) -> int:
    """How many of the largest values hold both interpolation points of the quantile position q*(total-1)."""
    return total - math.floor(q * (total - 1))


@torch.no_grad()
def activation_percentiles(ann: nn.Module, batches: Iterable[Tensor], percentile: float) -> dict[str, float]:
    """{activation module name: p-th percentile of its outputs over `batches`}; the ANN runs in eval mode."""
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile!r}")
    batches = list(batches)
    if not batches:
        raise ValueError("activation_percentiles needs at least one batch")
    q = percentile / 100
    samples = sum(x.shape[0] for x in batches)
    layers = {name: m for name, m in ann.named_modules() if is_activation(m)}
    tails: dict[str, Tensor] = {}
    totals: dict[str, int] = {}

    def keep_tail(name: str):
        def hook(_module, _inputs, output: Tensor) -> None:
            totals[name] = output[0].numel() * samples
            values = output.detach().flatten().double()
            if name in tails:
                values = torch.cat([tails[name], values])
            keep = min(values.numel(), _upper_tail_size(totals[name], q))
            tails[name] = values.topk(keep, sorted=False).values
        return hook

    handles = [m.register_forward_hook(keep_tail(name)) for name, m in layers.items()]
    was_training = ann.training
    ann.eval()
    try:
        for x in batches:
            ann(x)
    finally:
        ann.train(was_training)
        for handle in handles:
            handle.remove()
    result = {}
    for name, tail in tails.items():
        total = totals[name]
        position = q * (total - 1)
        lo = math.floor(position)
        hi = min(lo + 1, total - 1)
        descending = tail.sort(descending=True).values
        v_lo, v_hi = descending[total - 1 - lo], descending[total - 1 - hi]
        result[name] = float(v_lo + (position - lo) * (v_hi - v_lo))
    return result


@torch.no_grad()
def set_thresholds(snn: SpikingNet, percentiles: dict[str, float], scale: float = 1.0) -> None:
    """Set neuron `body.<name>`'s `vth` to `percentiles[name] * scale` for every neuron of `snn`."""
    neurons = {name.removeprefix("body."): m for name, m in snn.named_modules() if isinstance(m, SpikingNeuron)}
    missing = sorted(set(neurons) - set(percentiles))
    if missing:
        raise ValueError(f"no ANN activation for neuron(s) {', '.join(missing)}; the ANN must be the SNN's backbone")
    for name, neuron in neurons.items():
        neuron.vth.fill_(percentiles[name] * scale)
