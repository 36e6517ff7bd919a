"""Batch norm over the global batch of all processes, on any device (`engine.sync_bn`).

torch's `nn.SyncBatchNorm` refuses CPU tensors, so the harness uses this one module on CPU and GPU alike
(one tested path). In training, with N processes holding batches x_r of n_r samples (n = sum_r n_r,
statistics per channel c over every dimension but the channel one; DSR's merged `[T*B, ...]` batch
counts T*B samples):
  mean_c = sum_r sum(x_r[:, c]) / n
  var_c  = sum_r sum((x_r[:, c] - mean_c)^2) / n          (biased, as BatchNorm normalises with)
  y      = (x - mean_c) / sqrt(var_c + eps) * weight_c + bias_c
One differentiable all-gather per layer carries each rank's (n_r, m_r, M2_r): its sample count, mean and
sum of squared deviations, computed in two passes over its own batch as BatchNorm computes them; every rank
then combines them exactly as Chan et al.'s pairwise update does (SyncBatchNorm's scheme):
  mean = sum_r n_r m_r / n,    var = (sum_r M2_r + sum_r n_r (m_r - mean)^2) / n
with no difference of squares (a one-pass sum / sum-of-squares all-reduce loses digits where mean^2 >> var, and
was measured to turn the 2-process DSR run of tests/test_distributed.py 5e-3 away from one process, against
< 1e-6 for this). Its backward sends each rank the gradient of its own slice, summed over all ranks, so dL/dx on
each rank is exactly the global-batch gradient. The count is a fill on the device and nothing is read back to
the host. The running statistics are updated on every rank with the same global values (unbiased variance
var_c * n / (n - 1)), so they stay identical across ranks (why DDP need not broadcast buffers before each
forward: `distributed.apply_ddp`).
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


def all_gather_differentiable(tensor: Tensor) -> Tensor:
    """`[N, k]`: row r is rank r's `tensor` (`[k]`); differentiable (its backward reduce-scatters the gradient)."""
    return funcol.wait_tensor(funcol.all_gather_single_autograd(tensor.unsqueeze(0), 0, dist.group.WORLD))


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
        channels = x.shape[1]
        xf = x.float()
        local_count = xf.new_full((1,), x.numel() / channels)  # a fill on the device, not a host copy
        local_mean = xf.mean(dims)
        local_m2 = (xf - local_mean.view(shape)).pow(2).sum(dims)  # two passes on each rank, as BatchNorm
        gathered = all_gather_differentiable(torch.cat([local_count, local_mean, local_m2]))  # [N, 2C + 1]
        counts, means, m2s = gathered[:, :1], gathered[:, 1:channels + 1], gathered[:, channels + 1:]
        count = counts.sum()
        mean = (counts * means).sum(0) / count
        var = (m2s.sum(0) + (counts * (means - mean).pow(2)).sum(0)) / count
        centred = xf - mean.view(shape)
        self.last_statistics = (mean.detach(), var.detach())
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / self.num_batches_tracked if self.momentum is None else self.momentum  # no host read
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
