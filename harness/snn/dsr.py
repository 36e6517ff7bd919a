"""DSR neurons: exact forward dynamics, and the DSR backward (DSR.md sections 1-3).

Forward (u_0 = 0 per sample, reset by subtraction, at most one spike per step):
  IF:  u_t = u_{t-1} + x_t;                   o_t = V*1[u_t >= alpha*V];   u_t -= o_t
  LIF: u_t = beta*u_{t-1} + (1-beta)*x_t;     s_t = V*1[u_t >= alpha*V];   u_t -= s_t;  o_t = s_t/dt
       beta = exp(-dt/tau)
Backward (no backpropagation through time, no surrogate): with upstream gradients g_t,
  IF:  G = sum_t g_t;                dL/dx_t = (G/T) * 1[0 <= xbar <= V]
                                     dL/dV   = k_V * sum(G * 1[xbar > V])
  LIF: G = T * sum_t w_t g_t / W;    dL/dx_t = (G/(tau*T)) * 1[0 < xhat < V*tau/dt]
                                     dL/dV   = k_V * dt * sum(G * 1[xhat > V*tau/dt])
  with xbar = mean_t x_t, xhat = sum_t w_t x_t / W, w_t = exp(-(T-t)*dt/tau), W = sum_t w_t, and
  k_V = `vth_grad_scale`. The backward keeps only xbar / xhat (`[B, ...]`, O(1) in T) and V.
Before every forward the threshold is clamped in place: V <- max(V, vth_bound); the training engines
also clamp it after every optimizer step in the copy the optimizer updates (`parameter_bounds`).

The membrane potential is integrated in at least float32 whatever the input dtype (bf16 over T=50 steps
would lose the small inputs); spikes are returned in the input dtype.
"""

import math

import torch
from torch import Tensor, nn

from harness.snn import kernels
from harness.snn.coding import check_positive, decoding_weights, weighted_rate
from harness.snn.neuron import SpikingNeuron, accumulation_dtype
from harness.snn.time import unfold_time


def _constants(vth: Tensor, alpha: float, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """V and the firing threshold alpha*V as 0-dim tensors in the accumulation dtype (on V's device: no host read)."""
    v = vth.detach().to(acc)
    return v, alpha * v


def if_dynamics(x: Tensor, vth: Tensor, T: int, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """IF forward on `[T*B, ...]`: `(spikes [T*B, ...] in x's dtype, xbar [B, ...], V)`, both in the
    accumulation dtype. Exact and representation modes share it; the loop runs in `harness.snn.kernels`
    (plain or fused, the same spikes)."""
    v, threshold = _constants(vth, alpha, accumulation_dtype(x))
    out, xbar = kernels.if_forward(x, v, threshold, T)
    return out, xbar, v


def lif_dynamics(x: Tensor, vth: Tensor, T: int, alpha: float, tau: float, dt: float) -> tuple[Tensor, Tensor, Tensor]:
    """LIF forward on `[T*B, ...]`: `(outputs spike/dt [T*B, ...], xhat [B, ...], V)`; as `if_dynamics`."""
    acc = accumulation_dtype(x)
    v, threshold = _constants(vth, alpha, acc)
    beta = math.exp(-dt / tau)
    w = decoding_weights(T, tau, dt, device=x.device, dtype=acc)
    out, xhat = kernels.lif_forward(x, v, threshold, v / dt, w, w.sum(), T, beta, 1.0 - beta)
    return out, xhat, v


class _DSRIFFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, vth: Tensor, T: int, alpha: float, vth_grad_scale: float) -> Tensor:
        out, xbar, v = if_dynamics(x, vth, T, alpha)
        ctx.save_for_backward(xbar, v)
        ctx.T, ctx.vth_grad_scale, ctx.vth_dtype = T, vth_grad_scale, vth.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        xbar, v = ctx.saved_tensors
        grad_x, above = kernels.if_backward(grad_out, xbar, v, ctx.T)
        grad_vth = (ctx.vth_grad_scale * above.sum()).to(ctx.vth_dtype) if ctx.needs_input_grad[1] else None
        return grad_x if ctx.needs_input_grad[0] else None, grad_vth, None, None, None


class _DSRLIFFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, vth: Tensor, T: int, alpha: float, tau: float, dt: float,
                vth_grad_scale: float) -> Tensor:
        out, xhat, v = lif_dynamics(x, vth, T, alpha, tau, dt)
        ctx.save_for_backward(xhat, v)
        ctx.T, ctx.tau, ctx.dt, ctx.vth_grad_scale, ctx.vth_dtype = T, tau, dt, vth_grad_scale, vth.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        xhat, v = ctx.saved_tensors
        T, tau, dt = ctx.T, ctx.tau, ctx.dt
        w = decoding_weights(T, tau, dt, device=xhat.device, dtype=xhat.dtype)
        w_sum = sum([math.exp(-k * dt / tau) for k in range(T)])  # W, a constant (a list: torch.compile folds it)
        grad_x, above = kernels.lif_backward(grad_out, xhat, v * tau / dt, w, T, tau, w_sum)
        grad_vth = (ctx.vth_grad_scale * dt * above.sum()).to(ctx.vth_dtype) if ctx.needs_input_grad[1] else None
        return grad_x if ctx.needs_input_grad[0] else None, grad_vth, None, None, None, None, None


class _RepresentationFunction(torch.autograd.Function):
    """One DSR layer in the representation pass (`method.backward: representation`, representation.py).

    Forward: the recorded output representation `a` ([B, ...], from the spiking pass), whatever `z` (the
    representation pass's input to the layer) is. Backward, with `G = dL/da`:
        dL/dz = slope * G * in_range,      dL/dV = vth_scale * sum(G * above)
    where `in_range`, `above` are the clamp's (disjoint) masks at the recorded input representation (see
    `_DSRNeuron.representation`). Saved for backward: one byte per element (0 below, 1 in range, 2 above).
    """

    @staticmethod
    def forward(ctx, z: Tensor, vth: Tensor, a: Tensor, in_range: Tensor, above: Tensor, slope: float,
                vth_scale: float) -> Tensor:
        ctx.save_for_backward(in_range.to(torch.int8) + 2 * above.to(torch.int8))
        ctx.slope, ctx.vth_scale, ctx.z_dtype, ctx.vth_dtype = slope, vth_scale, z.dtype, vth.dtype
        return a.clone()

    @staticmethod
    def backward(ctx, grad_a: Tensor):
        (region,) = ctx.saved_tensors
        G = grad_a.to(accumulation_dtype(grad_a))
        grad_z = grad_vth = None
        if ctx.needs_input_grad[0]:
            grad_z = (G * (region == 1) * ctx.slope if ctx.slope != 1.0 else G * (region == 1)).to(ctx.z_dtype)
        if ctx.needs_input_grad[1]:
            grad_vth = (ctx.vth_scale * (G * (region == 2)).sum()).to(ctx.vth_dtype)
        return grad_z, grad_vth, None, None, None, None, None


class _DSRNeuron(SpikingNeuron):
    """Shared threshold handling of the DSR IF and LIF neurons."""

    def __init__(self, T: int, vth: float, alpha: float, vth_bound: float, vth_grad_scale: float,
                 train_vth: bool):
        super().__init__(T)
        check_positive("vth", vth)
        check_positive("vth_bound", vth_bound)
        if not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1] (firing factor), got {alpha!r}")
        if not isinstance(vth_grad_scale, (int, float)) or not math.isfinite(vth_grad_scale) or vth_grad_scale < 0:
            raise ValueError(f"vth_grad_scale must be a finite number >= 0, got {vth_grad_scale!r}")
        self.alpha = float(alpha)
        self.vth_bound = float(vth_bound)
        self.vth_grad_scale = float(vth_grad_scale)
        self.vth = nn.Parameter(torch.tensor(float(vth)), requires_grad=bool(train_vth))

    def parameter_bounds(self) -> list[tuple[nn.Parameter, float]]:
        return [(self.vth, self.vth_bound)]

    def spike_and_represent(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The spiking pass of `method.backward: representation` (call under `torch.no_grad()`): the same
        spikes as `forward`, bit for bit, and `(input representation, output representation)`, `[B, ...]`
        each (xbar and the rate for IF, xhat and the weighted rate for LIF)."""
        unfold_time(x, self.T)
        self.clamp_threshold()
        out, x_rep, _ = self.dynamics(x)
        return out, x_rep, self.decode(out)

    def representation(self, z: Tensor, x_rep: Tensor, a: Tensor) -> Tensor:
        """The representation pass: value `a`, backward DSR's derivative of the clamp at `x_rep`
        (`_RepresentationFunction`). `z` is this layer's input computed at batch B from the representations
        of the layers below; only its gradient matters."""
        v = self.vth.detach().to(x_rep.dtype)
        in_range, above, slope, vth_scale = self.clamp_masks(x_rep, v)
        return _RepresentationFunction.apply(z, self.vth, a, in_range, above, slope, vth_scale)

    def clamp_threshold(self) -> None:
        """V <- max(V, vth_bound), in place (DSR.md section 3)."""
        with torch.no_grad():
            self.vth.clamp_(min=self.vth_bound)

    def extra_repr(self) -> str:
        return (f"T={self.T}, vth={self.vth.item():.4g}, alpha={self.alpha}, vth_bound={self.vth_bound}, "
                f"vth_grad_scale={self.vth_grad_scale}, train_vth={self.vth.requires_grad}")


class DSRIF(_DSRNeuron):
    """DSR integrate-and-fire neuron; spikes of amplitude `vth`; decodes by the rate.

    Args:
        T: time steps merged into the batch, input `[T*B, ...]`.
        vth: initial threshold V (> 0), a trainable scalar parameter `self.vth`.
        alpha: firing factor in (0, 1]: fire when u >= alpha*V, reset by V.
        vth_bound: lower bound V_bound (> 0) applied to V before every forward.
        vth_grad_scale: k_V, the factor on the threshold gradient (1 CIFAR/DVS, 0.001 ImageNet).
        train_vth: whether V receives gradients.
    """

    def __init__(self, T: int, vth: float = 6.0, alpha: float = 0.5, vth_bound: float = 0.01,
                 vth_grad_scale: float = 1.0, train_vth: bool = True):
        super().__init__(T, vth, alpha, vth_bound, vth_grad_scale, train_vth)

    def forward(self, x: Tensor) -> Tensor:
        unfold_time(x, self.T)
        self.clamp_threshold()
        return _DSRIFFunction.apply(x, self.vth, self.T, self.alpha, self.vth_grad_scale)

    def dynamics(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return if_dynamics(x, self.vth, self.T, self.alpha)

    def clamp_masks(self, xbar: Tensor, v: Tensor) -> tuple[Tensor, Tensor, float, float]:
        """d clamp(xbar, 0, V) / d xbar = 1[0 <= xbar <= V] (closed); dV from 1[xbar > V], scale k_V."""
        return (xbar >= 0) & (xbar <= v), xbar > v, 1.0, self.vth_grad_scale


class DSRLIF(_DSRNeuron):
    """DSR leaky integrate-and-fire neuron; outputs `spike/dt`; decodes by the weighted rate.

    Args:
        T, vth, alpha, vth_bound, vth_grad_scale, train_vth: as `DSRIF`.
        tau: membrane time constant (> 0, fixed, not trained); beta = exp(-dt/tau).
        dt: time step length (> 0); also scales the threshold gradient by dt (DSR.md section 3).
    """

    def __init__(self, T: int, vth: float = 0.3, alpha: float = 0.3, vth_bound: float = 5e-4,
                 tau: float = 1.0, dt: float = 0.05, vth_grad_scale: float = 1.0, train_vth: bool = True):
        super().__init__(T, vth, alpha, vth_bound, vth_grad_scale, train_vth)
        self.tau = check_positive("tau", tau)
        self.dt = check_positive("dt", dt)

    def forward(self, x: Tensor) -> Tensor:
        unfold_time(x, self.T)
        self.clamp_threshold()
        return _DSRLIFFunction.apply(x, self.vth, self.T, self.alpha, self.tau, self.dt, self.vth_grad_scale)

    def dynamics(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return lif_dynamics(x, self.vth, self.T, self.alpha, self.tau, self.dt)

    def clamp_masks(self, xhat: Tensor, v: Tensor) -> tuple[Tensor, Tensor, float, float]:
        """d clamp(xhat/tau, 0, V/dt) / d xhat = (1/tau) 1[0 < xhat < V*tau/dt] (open); dV from
        1[xhat > V*tau/dt] with DSR's scale k_V*dt (DSR.md section 3)."""
        upper = v * self.tau / self.dt  # as the exact backward computes it: the same masks
        return (xhat > 0) & (xhat < upper), xhat > upper, 1.0 / self.tau, self.vth_grad_scale * self.dt

    def decode(self, y: Tensor) -> Tensor:
        return weighted_rate(y, self.T, self.tau, self.dt)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tau={self.tau}, dt={self.dt}"
