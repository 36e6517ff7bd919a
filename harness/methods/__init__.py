"""Methods: each turns the recipe's backbone into the model a method trains, with its loss.

`build(model, method, data_info) -> MethodModel`, from the recipe's `model` and `method` sections and what
the data says. Registry `METHODS` maps `method.name` to a module-level `build` function; every method
spikifies (or not) the SAME timm backbone (`base.create_backbone`), so comparisons are fair by
construction (DESIGN.md). A method that takes single images (ann, qcfs) refuses frame sequences (DVS).
"""

from collections.abc import Callable

from harness.methods import ann, dsr, qcfs, sg
from harness.methods.base import DataInfo, MethodModel, create_backbone
from harness.recipe import IMAGE_ONLY_METHODS, Method, ModelConfig, RecipeError

METHODS: dict[str, Callable[[ModelConfig, Method, DataInfo], MethodModel]] = {
    "ann": ann.build,
    "dsr": dsr.build,
    "sg": sg.build,
    "qcfs": qcfs.build,
}


def build(model: ModelConfig, method: Method, data: DataInfo) -> MethodModel:
    if data.is_sequence and method.name in IMAGE_ONLY_METHODS:
        raise RecipeError(f"method.name: {method.name} takes single images, but the data are frame sequences "
                          f"{list(data.input_shape)} (an event data set); use dsr or sg")
    return METHODS[method.name](model, method, data)


__all__ = ["METHODS", "DataInfo", "MethodModel", "build", "create_backbone"]
