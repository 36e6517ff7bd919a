"""`method.name: sg`: direct training with surrogate gradients and backpropagation through time.

The backbone is spikified with 0/1-spike IF or LIF neurons (`harness.snn.sg`). With `readout: analog`
(default, as STBP-tdBN and TET) the output layer keeps no neuron: O_t is its BN1d output at step t and the
logits are mean_t O_t; with `readout: spikes` O_t are its 0/1 spikes. Losses, with y the label:
  sdt: CE(mean_t O_t, y)                                          (standard direct training)
  tet: (1 - lambda) * (1/T) sum_t CE(O_t, y) + lambda * MSE(O, phi)  (Deng et al. 2022, as in its code:
       the MSE is the mean over all steps, samples and classes of (O_t - phi)^2; lambda 1e-3, phi 1.0)
tdbn (Zheng et al. 2021): every BatchNorm weight starts at alpha_bn * V_th; BN statistics are over the
merged T*B batch, as everywhere in the harness.
"""

from dataclasses import dataclass

import torch
from torch import nn

from harness.methods.base import DataInfo, MethodModel, create_backbone, drop_output_activation
from harness.recipe import ModelConfig, SGMethod
from harness.snn import SGIF, SGLIF, spikify


def tet_loss(steps: torch.Tensor, target: torch.Tensor, lam: float, phi: float) -> torch.Tensor:
    """TET's loss of per-step outputs `steps [T, B, classes]`."""
    per_step = torch.stack([nn.functional.cross_entropy(o, target) for o in steps]).mean()
    return (1 - lam) * per_step + lam * nn.functional.mse_loss(steps, torch.full_like(steps, phi))


@dataclass
class TETMethodModel(MethodModel):
    """A surrogate-gradient SNN trained with the TET loss; logits are still mean_t O_t."""

    tet_lambda: float = 1e-3
    tet_phi: float = 1.0

    def forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        steps = self.model.forward_steps(x)
        return tet_loss(steps.float(), y, self.tet_lambda, self.tet_phi), steps.mean(dim=0)


def neuron_factory(method: SGMethod):
    """A zero-argument builder of fresh neurons with the recipe's knobs."""
    common = dict(vth=method.vth, reset=method.reset, detach_reset=method.detach_reset,
                  surrogate=method.surrogate.name, width=method.surrogate.width, slope=method.surrogate.slope)
    if method.neuron == "lif":
        return lambda: SGLIF(method.T, leak=method.leak, **common)
    return lambda: SGIF(method.T, **common)


@torch.no_grad()
def init_tdbn(model: nn.Module, alpha_bn: float, vth: float) -> None:
    """Every BatchNorm weight <- alpha_bn * vth (threshold-dependent BN)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            m.weight.fill_(alpha_bn * vth)


def build(model: ModelConfig, method: SGMethod, data: DataInfo) -> MethodModel:
    ann = create_backbone(model, data, act_layer=nn.ReLU)
    if method.readout == "analog":
        drop_output_activation(ann, data.input_shape)
    snn = spikify(ann, neuron_factory(method), method.T, encoding=data.encoding)
    if method.tdbn:
        init_tdbn(snn, method.alpha_bn, method.vth)
    if method.loss == "tet":
        return TETMethodModel(model=snn, spiking=True, tet_lambda=method.tet_lambda, tet_phi=method.tet_phi)
    return MethodModel(model=snn, spiking=True)
