"""DSR's representation-space backward (`method.backward: representation`): a training step whose autograd
graph is that of an ANN at batch B, so its memory does not grow with T, with DSR's gradients.

Why it is possible (DSR.md section 3 and properties 4-5). DSR hands every time step of a neuron the same
gradient, and every layer between two neurons (conv, linear, average pooling, residual addition, batch norm
with given statistics) is affine and applied to each step alike, so it commutes with the time average: the
layer's output representation is the layer applied to its input representation. The gradient of a weight
is then the ANN gradient evaluated on representations (`dL/dW = (dL/dz)^T @ rbar`).

One step, `representation_step(net, x, feeders=...)` -> the logits, with a graph at batch B:
1. Spiking pass, no autograd graph (`spiking_pass`): the network runs on the T*B inputs exactly as in
   exact mode: the same code, the same spikes, bit for bit. Each DSR neuron records its input
   representation `x_rep` (xbar for IF, xhat for LIF) and its output representation `a` (rate / weighted
   rate), `[B, ...]` each. Each batch norm that normalises with batch statistics records the mean and the
   (biased) variance it used over the T*B samples (over every process's, for `GlobalBatchNorm`), updates
   its running statistics once, as in exact mode, and, for each conv or linear layer feeding it (directly or
   through residual additions, `batch_norm_feeders`), records the time covariance `D` (`time_covariance`).
2. Representation pass, with autograd, at batch B (`representation_pass`): the body runs as an ANN on the
   input's representation (`SpikingNet.represent_input`: the image for direct encoding, the decoded frames
   for sequences). Each neuron's value is its recorded `a` and its backward is DSR's derivative of the clamp
   at the recorded `x_rep` (`_DSRNeuron.representation`). Each recorded batch norm normalises with the
   recorded statistics, and its backward is batch norm's own with those statistics, mean and variance terms
   over the B representations, plus `-c * D` on each feeding layer's weight (`_RecordedBatchNorm`). Batch
   norm in eval mode uses its running statistics as usual.
3. The caller takes the loss on the output: for our backbones it is the last neuron's recorded `a`, so the
   logits and the loss equal exact mode's exactly.

The one term a representation cannot hold. In exact mode a train-mode batch norm's backward has a variance
term, `-(gamma/sigma) * xn_t * c`, that differs between steps (`xn_t` is step t's normalised input); it
reaches the weight of the layer feeding the batch norm as `sum_t xn_t in_t^T`, where representations give
only `T * xnbar inbar^T`. The difference, `sum_t (xn_t - xnbar)(in_t - inbar)^T`, is the time covariance of
the two; it is zero for the stem conv (its input is the same at every step) and it is systematic, not
noise: without it (`method.time_covariance: false`) the quickstart trains visibly worse (issue 12's note).
The spiking pass records it at the cost of one weight-gradient pass per feeding layer over T*B, memory the
size of the weights; everything else the backward needs sums over time into representations.

What it computes:
- IF neurons: exactly DSR's gradients, every parameter, thresholds included, batch norm in eval or training
  mode, to float round-off (tested on preact_resnet18_cifar and snn_convnet in float64). Without
  `time_covariance`, the weights of layers feeding a train-mode batch norm differ by `c * D`.
- LIF: the gradient of the weighted-representation ANN, not DSR's LIF backward. DSR hands every step the
  uniform gradient `G/(tau*T)` with `G = T * sum_t w_t g_t / W`, so a weight gradient pairs it with the
  *uniform* mean rate of the layer's input; here a weight gradient pairs `dL/dxhat` with the *weighted* rate
  the layer's input was decoded with, and the output layer's gradient is `dL/da`, where DSR's carries the
  factor `T * sum_t w_t^2 / W^2` (>= 1: 1.003 at T=4, dt=0.05; 1.012 at T=4, dt=0.1). Neuron masks and
  threshold scalings (`k_V * dt`) are DSR's. The two agree where the decoding weights are nearly uniform
  (`dt/tau * T` small); `harness bench backward` measures the per-parameter cosine similarity.

Refused: anything between neurons that does not commute with time averaging. `check_commutes` refuses,
before anything runs, a leaf module that is not one of conv, linear, batch norm, average pooling, flatten,
identity or dropout with p=0 (dropout draws a mask per step); `representation_step(..., verify=True)`
(the first training step of a run) checks that every neuron's input computed in the representation pass
equals its recorded `x_rep`, which catches what a module's code does between modules (a functional
nonlinearity, a max).

The two passes change what each neuron, batch norm and feeding layer computes by setting an instance
`forward` for the duration of the pass (removed afterwards): module hooks (DDP's, ZeRO-3's parameter
gathering) still run, and evaluation is untouched.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from harness.engine.sync_bn import GlobalBatchNorm, all_reduce_sum_differentiable, channel_dims
from harness.snn.neuron import SpikingNeuron, accumulation_dtype
from harness.snn.spikify import SpikingNet

_LINEAR_LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.AvgPool1d, nn.AvgPool2d,
                  nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Flatten,
                  nn.Unflatten, nn.Identity)


def _tolerance(dtype: torch.dtype) -> float:
    """Relative deviation between a neuron's input computed from representations and the recorded one above
    which the layers below it do not commute with time averaging: far above fp32 round-off of a conv (~1e-6),
    far below what a nonlinearity or a per-step mask produces (~1e-1); bf16/fp16 have their own round-off."""
    return 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2


class NotCommuting(ValueError):
    """A layer between neurons does not commute with time averaging; `.module` names it."""

    def __init__(self, module: str, message: str):
        super().__init__(message)
        self.module = module


def check_commutes(net: SpikingNet) -> None:
    """Raise `NotCommuting` naming the first leaf module of `net` that is neither a DSR neuron nor a layer
    that commutes with time averaging."""
    for name, module in net.named_modules():
        if next(module.children(), None) is not None:
            continue
        kind = type(module).__name__
        if isinstance(module, SpikingNeuron):
            if not hasattr(module, "spike_and_represent"):
                raise NotCommuting(name, f"{name} ({kind}) is not a DSR neuron")
        elif isinstance(module, nn.modules.dropout._DropoutNd):
            if module.p > 0:
                raise NotCommuting(name, f"{name} ({kind}, p={module.p}) draws a different mask at every time step "
                                         "(model.drop_rate: 0 removes it from our backbones)")
        elif not isinstance(module, _LINEAR_LAYERS):
            raise NotCommuting(name, f"{name} ({kind}) is not a layer that commutes with time averaging "
                                     "(conv, linear, batch norm, average pooling)")


@dataclass
class Tape:
    """What the spiking pass records for the representation pass of the same step."""

    neurons: dict[nn.Module, tuple[Tensor, Tensor]] = field(default_factory=dict)  # -> (x_rep, a)
    norms: dict[nn.Module, tuple[Tensor, Tensor]] = field(default_factory=dict)  # -> (mean, 1/sqrt(var+eps))
    # batch norm -> [(a layer feeding it, that layer's time-covariance term D)] (`time_covariance`)
    covariances: dict[nn.Module, list[tuple[nn.Module, Tensor]]] = field(default_factory=dict)
    deviations: dict[str, tuple[Tensor, float]] = field(default_factory=dict)  # neuron -> (deviation, tolerance)


@contextmanager
def _instance_forwards(forwards: dict[nn.Module, Callable[[Tensor], Tensor]]) -> Iterator[None]:
    """Give each module its replacement `forward` for the duration of the block."""
    try:
        for module, forward in forwards.items():
            module.forward = forward
        yield
    finally:
        for module in forwards:
            module.__dict__.pop("forward", None)


def _uses_batch_statistics(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    return bn.training or bn.running_mean is None


def _distributed_global(bn: nn.Module) -> bool:
    return isinstance(bn, GlobalBatchNorm) and bn.spans_processes()


def _batch_statistics(bn: nn.modules.batchnorm._BatchNorm, x: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, 1/sqrt(biased variance + eps)) per channel that `bn` just normalised `x` with. Computed by
    batch norm's own kernel (on a CPU three times faster than `torch.var_mean` over [N, H, W])."""
    if _distributed_global(bn):
        mean, var = bn.last_statistics
        return mean, torch.rsqrt(var + bn.eps)
    _, mean, inv_std = torch.native_batch_norm(x.to(accumulation_dtype(x)), None, None, None, None, True, 0.0, bn.eps)
    return mean, inv_std


_FEEDER_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_WEIGHT_GRADIENT = {nn.Conv1d: torch.nn.grad.conv1d_weight, nn.Conv2d: torch.nn.grad.conv2d_weight,
                    nn.Conv3d: torch.nn.grad.conv3d_weight}


def batch_norm_feeders(net: SpikingNet, sample: Tensor) -> dict[nn.Module, list[nn.Module]]:
    """For each batch norm of `net`, the conv and linear layers whose outputs reach its input through additions
    only (a residual sum counts), read off the autograd graph of one eval-mode forward of `sample` (one sample
    is enough: the graph's shape does not depend on the batch). Running statistics are left untouched."""
    layers = [m for m in net.body.modules() if isinstance(m, _FEEDER_LAYERS)]
    norms = [m for m in net.body.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    layer_of_node: dict = {}
    norm_input_node: dict = {}
    hooks = [m.register_forward_hook(lambda m, _i, out: layer_of_node.__setitem__(out.grad_fn, m)) for m in layers]
    hooks += [m.register_forward_pre_hook(lambda m, args: norm_input_node.__setitem__(m, args[0].grad_fn))
              for m in norms]
    modes = {m: m.training for m in net.modules()}
    net.eval()
    try:
        with torch.enable_grad():
            net(sample.detach().requires_grad_(sample.is_floating_point()))
    finally:
        for module, training in modes.items():
            module.training = training
        for hook in hooks:
            hook.remove()
    feeders: dict[nn.Module, list[nn.Module]] = {}
    for norm, node in norm_input_node.items():
        found, stack = [], [node]
        while stack:
            node = stack.pop()
            if node in layer_of_node:
                found.append(layer_of_node[node])
            elif node is not None and type(node).__name__.startswith("AddBackward"):
                stack.extend(parent for parent, _ in node.next_functions)
        feeders[norm] = found
    return feeders


def time_covariance(net: SpikingNet, layer: nn.Module, inputs: Tensor, norm_input: Tensor, mean: Tensor,
                    inv_std: Tensor) -> Tensor:
    """What a representation misses of the weight gradient of `layer`, which feeds a train-mode batch norm:
        D = (1/T) Wgrad(in_t, xn_t summed over t, b) - Wgrad(rep(in), xn(rep(z)))          (the weight's shape)
    with `in` the layer's inputs `[T*B, ...]`, `xn` the batch norm's normalised inputs, `rep` the decoding
    the second pass computes with, and `Wgrad(in, g)` the layer's weight gradient for output gradient `g`
    (`g^T in` for a linear layer). For IF, `D = (1/T) sum_{t,b} (xn_t - xnbar) (in_t - inbar)^T`: the time
    covariance that the variance term of batch norm's backward pairs with the weight. `_RecordedBatchNorm`
    adds `-c * D` to the weight's gradient (`c` per channel, module docstring), which makes it exact mode's.
    Cost: one weight-gradient pass of the layer over T*B (and one over B)."""
    acc = accumulation_dtype(norm_input)
    _, shape = channel_dims(norm_input)
    inv_std, mean = inv_std.to(acc).view(shape), mean.to(acc).view(shape)
    normalised = (norm_input.to(acc) - mean) * (inv_std / net.T)
    normalised_rep = (net.decode(norm_input).to(acc) - mean) * inv_std

    def weight_gradient(layer_input: Tensor, grad_output: Tensor) -> Tensor:
        if isinstance(layer, nn.Linear):
            return grad_output.T @ layer_input.to(acc)
        return _WEIGHT_GRADIENT[type(layer)](layer_input.to(acc), layer.weight.shape, grad_output, layer.stride,
                                             layer.padding, layer.dilation, layer.groups)

    return weight_gradient(inputs, normalised) - weight_gradient(net.decode(inputs), normalised_rep)


def spiking_pass(net: SpikingNet, x: Tensor, feeders: dict[nn.Module, list[nn.Module]] | None = None
                 ) -> tuple[Tensor, Tape]:
    """Step 1 (see the module docstring): `net(x)` without a graph, recording the tape. Returns the
    spiking network's logits (exact mode's, bit for bit) and the tape. With `feeders`
    (`batch_norm_feeders`), the time covariance of each feeding layer is recorded too (`time_covariance`)."""
    tape = Tape()
    feeders = feeders or {}
    layer_inputs: dict[nn.Module, Tensor] = {}  # a feeding layer's input, until its batch norm has run

    def neuron_forward(neuron: nn.Module) -> Callable[[Tensor], Tensor]:
        def forward(x_in: Tensor) -> Tensor:
            out, x_rep, a = neuron.spike_and_represent(x_in)
            tape.neurons[neuron] = (x_rep, a)
            return out
        return forward

    def feeder_forward(layer: nn.Module) -> Callable[[Tensor], Tensor]:
        def forward(x_in: Tensor) -> Tensor:
            layer_inputs[layer] = x_in
            return type(layer).forward(layer, x_in)
        return forward

    def norm_forward(bn: nn.Module) -> Callable[[Tensor], Tensor]:
        def forward(x_in: Tensor) -> Tensor:
            y = type(bn).forward(bn, x_in)
            if _uses_batch_statistics(bn):
                mean, inv_std = tape.norms[bn] = _batch_statistics(bn, x_in)
                tape.covariances[bn] = [(layer, time_covariance(net, layer, layer_inputs.pop(layer), x_in, mean,
                                                                inv_std))
                                        for layer in feeders.get(bn, ()) if layer in layer_inputs]
            return y
        return forward

    forwards = {m: neuron_forward(m) for m in net.neurons()}
    forwards.update({m: norm_forward(m) for m in net.body.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)})
    forwards.update({m: feeder_forward(m) for layers in feeders.values() for m in layers})
    with torch.no_grad(), _instance_forwards(forwards):
        logits = net(x)
    return logits, tape


class _RecordedBatchNorm(torch.autograd.Function):
    """Batch norm of the representations `z` with the statistics recorded in the spiking pass.

    Forward: `xn = (z - mean) * inv_std`, `y = gamma * xn + beta` (the recorded mean and 1/sqrt(var + eps)).
    Backward, with `G = dL/dy`, means over the batch of representations (of every process when
    `global_batch`) and `xc = xn - mean(xn)`:
        dL/dz = gamma / sqrt(var + eps) * (G - mean(G) - xc * mean(G * xc)),
        dL/dgamma = sum(G * xn),   dL/dbeta = sum(G)   (this process's part, as for any parameter)
    which is batch norm's own backward with the statistics of the T*B spiking batch. When the gradient reaching
    the layer is the same at every time step (a DSR neuron above it), this `dL/dz` is exactly the time sum of
    exact mode's `dL/dx_t`, variance term included. What a representation cannot carry, the time covariance in
    the weight gradient of each layer feeding the batch norm, comes as `covariances` (`time_covariance`, one per
    `feeder_weights`): their gradient is `-c * D`, `c = gamma / sqrt(var + eps) * mean(G * xc)` per channel
    (module docstring). For IF, `mean(xn)` is 0
    (the recorded mean is the representations' mean); for LIF (weighted representations) it is not, and
    centring keeps `dL/dz` blind to a constant shift, as batch norm is (a bias before it gets no gradient).
    Saved: `xn`.
    """

    @staticmethod
    def forward(ctx, z: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, inv_std: Tensor,
                global_batch: bool, covariances: tuple[Tensor, ...], *feeder_weights: Tensor) -> Tensor:
        _, shape = channel_dims(z)
        ctx.feeder_dtypes = [w.dtype for w in feeder_weights]
        acc = accumulation_dtype(z)
        xn = (z.to(acc) - mean.to(acc).view(shape)) * inv_std.to(acc).view(shape)
        y = xn if weight is None else xn * weight.to(acc).view(shape) + bias.to(acc).view(shape)
        ctx.save_for_backward(xn.to(z.dtype), inv_std, weight, *covariances)
        ctx.global_batch, ctx.z_dtype = global_batch, z.dtype
        return y.to(z.dtype)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        xn, inv_std, weight, *covariances = ctx.saved_tensors
        dims, shape = channel_dims(grad_y)
        acc = accumulation_dtype(grad_y)
        G, xn = grad_y.to(acc), xn.to(acc)
        sum_g, sum_gx = G.sum(dims), (G * xn).sum(dims)
        totals = torch.cat([sum_g, sum_gx, xn.sum(dims), sum_g.new_full((1,), G.numel() / G.shape[1])])  # no H2D copy
        if ctx.global_batch:  # functional collective, as GlobalBatchNorm's own backward (ordered with DDP's)
            totals = all_reduce_sum_differentiable(totals)
        mean_g, mean_gx, mean_x = (totals[:-1] / totals[-1]).view(3, -1)
        xc = xn - mean_x.view(shape)  # centred on the representations' own batch mean (= the recorded one for IF)
        scale = inv_std.to(acc) if weight is None else inv_std.to(acc) * weight.to(acc)
        grad_z = scale.view(shape) * (G - mean_g.view(shape) - xc * (mean_gx - mean_g * mean_x).view(shape))
        grad_w = sum_gx.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = sum_g.to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        coefficient = scale * (mean_gx - mean_g * mean_x)  # the variance term's, per channel
        grad_feeders = [(-coefficient.view(-1, *[1] * (d.dim() - 1)) * d).to(dtype) if needed else None
                        for d, dtype, needed in zip(covariances, ctx.feeder_dtypes, ctx.needs_input_grad[7:],
                                                    strict=True)]
        return grad_z.to(ctx.z_dtype), grad_w, grad_b, None, None, None, None, *grad_feeders


def representation_pass(net: SpikingNet, x: Tensor, tape: Tape, verify: bool = False) -> Tensor:
    """Step 2 (see the module docstring): the body at batch B on representations, with autograd. With
    `verify`, each neuron's relative input deviation is left in `tape.deviations` (see `check_deviations`)."""
    names = {m: name for name, m in net.named_modules()} if verify else {}

    def neuron_forward(neuron: nn.Module) -> Callable[[Tensor], Tensor]:
        def forward(z: Tensor) -> Tensor:
            x_rep, a = tape.neurons[neuron]
            if verify:
                scale = x_rep.abs().max().clamp(min=torch.finfo(x_rep.dtype).tiny)
                deviation = (z.detach().to(x_rep.dtype) - x_rep).abs().max() / scale
                tape.deviations[names[neuron]] = (deviation, _tolerance(z.dtype))
            return neuron.representation(z, x_rep, a)
        return forward

    def norm_forward(bn: nn.Module) -> Callable[[Tensor], Tensor]:
        def forward(z: Tensor) -> Tensor:
            mean, inv_std = tape.norms[bn]
            covariances = tape.covariances.get(bn, [])
            weights = [layer.weight for layer, _ in covariances]
            return _RecordedBatchNorm.apply(z, bn.weight, bn.bias, mean, inv_std, _distributed_global(bn),
                                            tuple(d for _, d in covariances), *weights)
        return forward

    forwards = {m: neuron_forward(m) for m in tape.neurons}
    forwards.update({m: norm_forward(m) for m in tape.norms})
    with _instance_forwards(forwards):
        return net.body(net.represent_input(x))


def check_deviations(tape: Tape) -> None:
    """Raise `NotCommuting` naming the first neuron whose input, computed in the representation pass, is not
    its recorded representation (one host read)."""
    if not tape.deviations:
        return
    values = torch.stack([d.float() for d, _ in tape.deviations.values()]).tolist()
    for (name, (_, tolerance)), value in zip(tape.deviations.items(), values, strict=True):
        if not value <= tolerance:
            raise NotCommuting(name, f"the input of {name}, computed from the representations of the layers below, "
                                     f"differs from its time average in the spiking pass by {value:.2g} (relative; "
                                     f"tolerance {tolerance:g}): something between the neurons below it does not "
                                     "commute with time averaging (a nonlinearity or a max in a module's code?)")


def representation_step(net: SpikingNet, x: Tensor, verify: bool = False,
                        feeders: dict[nn.Module, list[nn.Module]] | None = None) -> Tensor:
    """Steps 1 and 2: the logits `[B, classes]`, with a graph at batch B whose backward is DSR's (module
    docstring). `verify` also checks that the layers commute with time averaging (`check_deviations`);
    `feeders` (`batch_norm_feeders`): the layers whose time covariance is recorded, None for none."""
    _, tape = spiking_pass(net, x, feeders)
    logits = representation_pass(net, x, tape, verify=verify)
    if verify:
        check_deviations(tape)
    return logits
