"""`method.name: ann`: the backbone trained as an ANN with ReLU, the reference accuracy for DSR and the
source model of the hybrid start (DSR.md section 4)."""

from torch import nn

from harness.methods.base import DataInfo, MethodModel, create_backbone
from harness.recipe import Recipe


def build(recipe: Recipe, data: DataInfo) -> MethodModel:
    return MethodModel(model=create_backbone(recipe, data, act_layer=nn.ReLU), spiking=False)
