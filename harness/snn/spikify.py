"""Turn an ANN into its SNN: the same backbone serves every method (DESIGN.md, DSR.md section 4).

`spikify(model, neuron_factory, T)` deep-copies `model` and
  - replaces every activation module (ReLU and the other rectifier-like activations, plus any class
    given to `register_activation`) by a fresh `neuron_factory()`, so each layer has its own threshold;
  - replaces max pooling by average pooling of the same geometry (DSR.md: average pooling only);
  - wraps the result in `SpikingNet`, which encodes the input at the front (direct encoding: the image
    repeated T times; or a `[B, T, ...]` frame sequence folded time-major) and decodes the output at the
    back with the neurons' own representation (rate for IF, weighted rate for LIF).
An activation module must be called once per forward for each place it stands (timm's CNNs create one
module per place); a module attribute that shares its instance with another gets a neuron of its own.
"""

import copy
from collections.abc import Callable

from torch import Tensor, nn

from harness.snn.neuron import SpikingNeuron
from harness.snn.time import check_time_steps, repeat_time, sequence_to_time_major, unfold_time

_ACTIVATIONS: list[type[nn.Module]] = [
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardtanh,
]
ENCODINGS = ("direct", "sequence")


def register_activation(cls: type[nn.Module]) -> type[nn.Module]:
    """Make `spikify` replace modules of class `cls` by neurons (usable as a class decorator)."""
    if cls not in _ACTIVATIONS:
        _ACTIVATIONS.append(cls)
    return cls


def is_activation(module: nn.Module) -> bool:
    return isinstance(module, tuple(_ACTIVATIONS)) and not isinstance(module, SpikingNeuron)


class SpikingNet(nn.Module):
    """A spiking network with its input encoding and output decoding.

    Args:
        body: the spiking network on `[T*B, ...]`.
        T: time steps.
        decode: `[T*B, ...] -> [B, ...]`, the output representation (the logits).
        encoding: "direct" (input `[B, ...]` repeated T times) or "sequence" (input `[B, T, ...]`).
    """

    def __init__(self, body: nn.Module, T: int, decode: Callable[[Tensor], Tensor], encoding: str = "direct"):
        super().__init__()
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        self.body = body
        self.T = check_time_steps(T)
        self.decode = decode
        self.encoding = encoding

    def encode(self, x: Tensor) -> Tensor:
        if self.encoding == "direct":
            return repeat_time(x, self.T)
        if x.dim() < 2 or x.shape[1] != self.T:
            raise ValueError(f"sequence input must be [B, T={self.T}, ...], got shape {tuple(x.shape)}")
        return sequence_to_time_major(x)

    def represent_input(self, x: Tensor) -> Tensor:
        """The input's representation `[B, ...]`: the image itself (direct encoding), or the frames decoded as
        the neurons decode (sequence). DSR's representation mode runs the body on it."""
        return x if self.encoding == "direct" else self.decode(self.encode(x))

    def forward_steps(self, x: Tensor) -> Tensor:
        """The body's output per step, `[T, B, ...]` (for per-step losses)."""
        return unfold_time(self.body(self.encode(x)), self.T)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.body(self.encode(x)))

    def neurons(self) -> list[SpikingNeuron]:
        return [m for m in self.body.modules() if isinstance(m, SpikingNeuron)]


def _average_pool_like(pool: nn.Module) -> nn.Module:
    if isinstance(pool, nn.MaxPool2d):
        if pool.dilation not in (1, (1, 1)):
            raise ValueError(f"cannot replace {pool} by average pooling: dilation != 1")
        return nn.AvgPool2d(pool.kernel_size, pool.stride, pool.padding, ceil_mode=pool.ceil_mode,
                            count_include_pad=True)
    if isinstance(pool, nn.MaxPool1d):
        return nn.AvgPool1d(pool.kernel_size, pool.stride, pool.padding, ceil_mode=pool.ceil_mode)
    if isinstance(pool, nn.AdaptiveMaxPool2d):
        return nn.AdaptiveAvgPool2d(pool.output_size)
    return nn.AdaptiveAvgPool1d(pool.output_size)


_MAX_POOLS = (nn.MaxPool2d, nn.MaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool1d)


def replace_activations(module: nn.Module, make: Callable[[nn.Module], nn.Module]) -> int:
    """Replace, in place and recursively, every activation child `a` by `make(a)`; return the count."""
    count = 0
    for name, child in list(module.named_children()):
        if is_activation(child):
            setattr(module, name, make(child))
            count += 1
        elif isinstance(child, _MAX_POOLS):
            setattr(module, name, _average_pool_like(child))
        else:
            count += replace_activations(child, make)
    return count


def spikify(model: nn.Module, neuron_factory: Callable[[], SpikingNeuron], T: int,
            encoding: str = "direct") -> SpikingNet:
    """The SNN of `model`: every activation a fresh `neuron_factory()`, max pooling -> average pooling.

    The output is decoded with the neurons' `decode` (rate for IF, weighted rate for LIF). `model` is
    left untouched (deep copy), so its weights can be loaded into the SNN by the same state-dict keys,
    prefixed `body.`.
    """
    check_time_steps(T)
    probe = neuron_factory()
    if not isinstance(probe, SpikingNeuron) or probe.T != T:
        raise ValueError(f"neuron_factory must build SpikingNeuron modules with T={T}, got {probe!r}")
    body = copy.deepcopy(model)
    count = replace_activations(body, lambda _: neuron_factory())
    if count == 0:
        raise ValueError(f"spikify found no activation module in {type(model).__name__} "
                         f"(known: {[c.__name__ for c in _ACTIVATIONS]})")
    return SpikingNet(body, T, probe.decode, encoding)
