"""`method.name: ann`: the backbone trained as an ANN with ReLU, the reference accuracy for DSR and the
source model of the hybrid start (DSR.md section 4).

The logits are the output layer's pre-activation (its Linear -> BN1d, no ReLU): a ReLU on the logits can
silence a class for good (all its BN1d outputs negative, no gradient), as it did on mnist5k. The
activation has no parameters, so the checkpoint's state dict is exactly the spiking backbone's, and a
DSR hybrid start calibrates its output threshold from the ReLU of that pre-activation.
"""

from torch import nn

from harness.methods.base import DataInfo, MethodModel, create_backbone, drop_output_activation
from harness.recipe import AnnMethod, ModelConfig


def build(model: ModelConfig, method: AnnMethod, data: DataInfo) -> MethodModel:
    ann = drop_output_activation(create_backbone(model, data, act_layer=nn.ReLU), data.input_shape)
    return MethodModel(model=ann, spiking=False)
