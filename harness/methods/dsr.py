"""`method.name: dsr`: the backbone spikified with DSR IF or LIF neurons (DSR.md).

Logits are the output layer's spike representation (rate for IF, weighted rate for LIF); the loss is
cross-entropy on them; thresholds are ordinary parameters (same optimizer and weight decay).
"""

from torch import nn

from harness.methods.base import DataInfo, MethodModel, create_backbone
from harness.recipe import DSRMethod, Recipe
from harness.snn import DSRIF, DSRLIF, spikify


def neuron_factory(method: DSRMethod):
    """A zero-argument builder of fresh neurons with the recipe's knobs."""
    common = dict(vth=method.vth.init, alpha=method.alpha, vth_bound=method.vth.bound,
                  vth_grad_scale=method.vth.grad_scale, train_vth=method.vth.train)
    if method.neuron == "lif":
        return lambda: DSRLIF(method.T, tau=method.tau, dt=method.dt, **common)
    return lambda: DSRIF(method.T, **common)


def build(recipe: Recipe, data: DataInfo) -> MethodModel:
    method: DSRMethod = recipe.method
    ann = create_backbone(recipe, data, act_layer=nn.ReLU)
    encoding = "sequence" if data.is_sequence else "direct"
    snn = spikify(ann, neuron_factory(method), method.T, encoding=encoding)
    return MethodModel(model=snn, spiking=True)
