"""What every method hands the trainer: a model that maps a batch to logits, and its loss.

A method is built from the sections it needs (`model`, `method`) and what the data says (`DataInfo`),
never from the whole recipe; its hooks receive a `RunContext` (harness/engine/context.py), not the trainer.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import timm
import torch
from torch import nn

import harness.models  # noqa: F401  (registers our backbones in timm)
from harness.recipe import ModelConfig, RecipeError


@dataclass(frozen=True)
class DataInfo:
    """What a method needs to know of the data: classes and one sample's shape."""

    num_classes: int
    input_shape: tuple[int, ...]  # [C, H, W], or [T, C, H, W] for frame sequences (DVS)

    @property
    def is_sequence(self) -> bool:
        return len(self.input_shape) == 4

    @property
    def encoding(self) -> str:
        """How a spiking model takes this input: `SpikingNet`'s "sequence" or "direct"."""
        return "sequence" if self.is_sequence else "direct"


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, target)


@dataclass
class MethodModel:
    """`model(x) -> logits [B, classes]`; `loss(logits, target)`; `spiking` if it has neurons.

    `forward_loss(x, y)` -> (loss, logits): the training step's whole forward; a method whose loss
    needs more than the logits (per-step losses) subclasses and overrides it.
    `extra_eval(run) -> metrics`, if set, runs after each evaluation (e.g. a converted SNN at several T)
    and its metrics are logged with the others (a key the evaluation also wrote is replaced).
    `prepare(run)`, if set, runs once before the first epoch of a new run (never on resume): what needs
    training batches before training starts (e.g. threshold calibration from an ANN). `run` is the
    run's `RunContext`.
    """

    model: nn.Module
    spiking: bool
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy
    extra_eval: Callable[[Any], dict[str, float]] | None = None
    prepare: Callable[[Any], None] | None = None

    def forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return self.loss(logits, y), logits


@torch.no_grad()
def drop_output_activation(model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
    """Replace, in place, the activation module whose output IS the model's output (the head's
    `Linear -> BN1d -> act` in our backbones) by `nn.Identity`, so the logits are the last layer's
    pre-activation. Found by tracing one eval-mode forward on zeros of `input_shape` (a stock timm CNN
    ending in a Linear has no such activation and is returned unchanged). Returns `model`."""
    from harness.snn import is_activation

    outputs: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out))
               for name, m in model.named_modules() if is_activation(m)]
    was_training = model.training
    model.eval()
    try:
        result = model(torch.zeros(2, *input_shape[-3:]))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    for name, out in outputs.items():
        if out is result:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, nn.Identity())
    return model


def create_backbone(model: ModelConfig, data: DataInfo, act_layer: type[nn.Module] | None = None) -> nn.Module:
    """The ANN backbone of the recipe's `model` section, from timm's registry (ours are registered by
    harness.models)."""
    name = model.backbone
    if not timm.is_model(name):
        ours = ", ".join(sorted(timm.list_models(["preact_*", "snn_*", "vgg*_dvs"])))
        raise RecipeError(f"model.backbone: unknown backbone {name!r}; ours: {ours}; or any name in "
                          "timm.list_models()")
    kwargs = dict(num_classes=model.num_classes or data.num_classes, in_chans=data.input_shape[-3],
                  drop_rate=model.drop_rate)
    if act_layer is not None:
        kwargs["act_layer"] = act_layer
    kwargs.update(model.kwargs)
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise RecipeError(f"model: timm.create_model({name!r}) rejected the arguments: {e}") from None
