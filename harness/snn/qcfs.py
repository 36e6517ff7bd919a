"""The quantization-clip-floor-shift activation of QCFS conversion (Bu et al., ICLR 2022).

  QCFS(z) = lambda * clamp(floor(z*L/lambda + 1/2) / L, 0, 1)

with L quantization levels and lambda a trainable scalar per layer (initial 8). Computed as the authors'
code does, `lambda * floor(clamp(z/lambda, 0, 1) * L + 1/2) / L`, which has the same values; the floor is
straight-through (gradient 1), so dQCFS/dz = 1[0 <= z <= lambda] and lambda learns through both of its
appearances. The quantisation is computed in fp32 whatever the input dtype (under bf16 autocast the conv hands
it bf16), so its levels are those the converted IF neuron, which integrates in fp32, fires; the output is cast
back to the input dtype. After training, every QCFS becomes an IF neuron (convert.py) whose rate at T = L steps
equals this function exactly. The class is registered as an activation, so `spikify` replaces it too.
"""

import torch
from torch import Tensor, nn

from harness.snn.coding import check_positive
from harness.snn.spikify import register_activation


class _FloorStraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return torch.floor(x)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> Tensor:
        return grad_out


@register_activation
class QCFS(nn.Module):
    """QCFS activation with its own trainable clip `lam` (lambda).

    Args:
        L: quantization levels (>= 1).
        lambda_init: initial lambda (> 0).
    """

    def __init__(self, L: int = 4, lambda_init: float = 8.0):
        super().__init__()
        if isinstance(L, bool) or not isinstance(L, int) or L < 1:
            raise ValueError(f"L must be an integer >= 1 (quantization levels), got {L!r}")
        self.L = L
        self.lam = nn.Parameter(torch.tensor(check_positive("lambda_init", lambda_init)))

    def forward(self, z: Tensor) -> Tensor:
        lam = self.lam.float()  # fp32 whatever z is: in bf16 (autocast's conv output) the step near lambda = 4-8 is
        unit = torch.clamp(z.float() / lam, 0, 1)  # 0.03-0.06 and would move the quantisation boundaries
        return (lam * _FloorStraightThrough.apply(unit * self.L + 0.5) / self.L).to(z.dtype)

    def extra_repr(self) -> str:
        return f"L={self.L}, lam={self.lam.item():.4g}"
