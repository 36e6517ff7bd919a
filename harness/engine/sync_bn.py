"""Batch norm over the global batch of all processes, on any device (`engine.sync_bn`).

torch's `nn.SyncBatchNorm` refuses CPU tensors, so the harness uses this one module on CPU and GPU alike
(one tested path). In training, with N processes holding batches x_r of n_r samples (n = sum_r n_r,
statistics per channel c over every dimension but the channel one; DSR's merged `[T*B, ...]` batch
counts T*B samples):
  mean_c = sum_r sum(x_r[:, c]) / n
  var_c  = sum_r sum((x_r[:, c] - mean_c)^2) / n          (biased, as BatchNorm normalises with)
  y      = (x - mean_c) / sqrt(var_c + eps) * weight_c + bias_c
Two differentiable all-reduces (sums) carry the statistics; their backward all-reduces the gradient, so
dL/dx on each rank is exactly the global-batch gradient. The running statistics are updated on every rank
with the same global values (unbiased variance var_c * n / (n - 1)), so they stay identical across ranks.
In evaluation, or in a single process, it is plain `BatchNorm` (running statistics). The state-dict keys
are those of `nn.BatchNorm*d`, so checkpoints load into the unconverted model.
"""

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import _functional_collectives as funcol


def channel_dims(x: Tensor) -> tuple[list[int], list[int]]:
    """(the dimensions batch norm reduces over, the shape that broadcasts a per-channel vector) for `x`."""
    return [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)


def all_reduce_sum_differentiable(tensor: Tensor) -> Tensor:
    """Sum over all ranks, differentiable (its backward all-reduces the gradient)."""
    return funcol.wait_tensor(funcol.all_reduce(tensor, "sum", dist.group.WORLD))


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """`BatchNorm1d/2d/3d` whose training statistics are those of the batch of all processes.

    After a distributed training forward, `last_statistics` holds the (mean, biased variance) it normalised
    with, detached (DSR's representation mode records them, harness/snn/representation.py)."""

    @staticmethod
    def spans_processes() -> bool:
        """Whether training statistics are those of several processes (a process group of more than one)."""
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input [N, C, ...], got {input.dim()}D")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and self.spans_processes()):
            return super().forward(x)
        dims, shape = channel_dims(x)
        xf = x.float()
        local_count = xf.new_full((1,), x.numel() / x.shape[1])  # a fill on the device, not a host copy
        sums = all_reduce_sum_differentiable(torch.cat([xf.sum(dims), local_count]))
        count = sums[-1]
        mean = sums[:-1] / count
        centred = xf - mean.view(shape)
        var = all_reduce_sum_differentiable(centred.pow(2).sum(dims)) / count
        self.last_statistics = (mean.detach(), var.detach())
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_to_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every `BatchNorm1d/2d/3d` in `module` (in place, recursively) by a `GlobalBatchNorm`
    holding the same parameters and running statistics; return `module` (or the replacement if it is one).
    Convert before moving the model to its device: replacements are built on the CPU."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        replacement = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                      module.track_running_stats)
        replacement.load_state_dict(module.state_dict())
        replacement.train(module.training)
        return replacement
    for name, child in module.named_children():
        setattr(module, name, convert_to_global_batchnorm(child))
    return module
