"""Methods: each turns the recipe's backbone into the model a method trains, with its loss.

`build(recipe, data_info) -> MethodModel`. Registry `METHODS` maps `method.name` to a module-level
`build` function; every method spikifies (or not) the SAME timm backbone (`backbone.create_backbone`),
so comparisons are fair by construction (DESIGN.md).
"""

from collections.abc import Callable

from harness.methods import ann, dsr, qcfs, sg
from harness.methods.base import DataInfo, MethodModel, create_backbone
from harness.recipe import Recipe

METHODS: dict[str, Callable[[Recipe, DataInfo], MethodModel]] = {
    "ann": ann.build,
    "dsr": dsr.build,
    "sg": sg.build,
    "qcfs": qcfs.build,
}


def build(recipe: Recipe, data: DataInfo) -> MethodModel:
    return METHODS[recipe.method.name](recipe, data)


__all__ = ["METHODS", "DataInfo", "MethodModel", "build", "create_backbone"]
