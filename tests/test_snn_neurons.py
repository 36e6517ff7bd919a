"""DSR neurons and spike coding against the formulas of DSR.md sections 1-3 (properties of section 6).

References are direct float64 evaluations written here, step by step, not calls into the implementation.
Inputs are float64 so the implementation (which integrates in the input's precision, at least float32)
and the reference perform the same arithmetic: spikes must agree exactly; gradients to 1e-12.
"""

import math

import pytest
import torch

from harness.snn import DSRIF, DSRLIF, decoding_weights, fold_time, rate, repeat_time, unfold_time, weighted_rate

STEPS = [1, 2, 5, 20]
SHAPES = [(3,), (4, 7), (2, 3, 5, 5)]  # [B, ...] per step


def reference_if(x_steps, V, alpha):
    """IF of DSR.md section 1: returns spikes [T, B, ...] and the final potential u_T."""
    u = torch.zeros_like(x_steps[0])
    out = []
    for x_t in x_steps:
        u = u + x_t
        o = V * (u >= alpha * V).double()
        u = u - o
        out.append(o)
    return torch.stack(out), u


def reference_lif(x_steps, V, alpha, tau, dt):
    beta = math.exp(-dt / tau)
    u = torch.zeros_like(x_steps[0])
    out = []
    for x_t in x_steps:
        u = beta * u + (1 - beta) * x_t
        s = V * (u >= alpha * V).double()
        u = u - s
        out.append(s / dt)
    return torch.stack(out), u


def lif_weights(T, tau, dt):
    return torch.tensor([math.exp(-(T - t) * dt / tau) for t in range(1, T + 1)], dtype=torch.float64)


def random_input(T, shape, seed, scale=8.0, shift=-2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand((T, *shape), generator=g, dtype=torch.float64) * scale + shift)


@pytest.mark.parametrize("T", STEPS)
@pytest.mark.parametrize("shape", SHAPES)
def test_if_forward_matches_reference_and_spikes_are_zero_or_v(T, shape):
    V, alpha = 2.5, 0.5
    x = random_input(T, shape, seed=T)
    neuron = DSRIF(T, vth=V, alpha=alpha)
    y = neuron(fold_time(x))
    assert y.shape == fold_time(x).shape
    assert set(y.unique().tolist()) <= {0.0, V}
    expected, u_T = reference_if(x, V, alpha)
    assert torch.equal(unfold_time(y, T), expected)
    # identity: mean_t o_t = xbar - u_T / T
    torch.testing.assert_close(rate(y, T), x.mean(0) - u_T / T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("T", STEPS)
@pytest.mark.parametrize("alpha", [0.3, 0.5, 1.0])
def test_if_rate_error_bound_for_inputs_in_zero_v(T, alpha):
    V = 1.7
    x = random_input(T, (64, 9), seed=100 + T, scale=V, shift=0.0)  # inputs in [0, V]
    neuron = DSRIF(T, vth=V, alpha=alpha)
    V = neuron.vth.item()
    a = rate(neuron(fold_time(x)), T)
    err = a - x.mean(0)
    assert (err > -alpha * V / T - 1e-12).all() and (err <= (1 - alpha) * V / T + 1e-12).all()
    if alpha == 0.5:
        assert err.abs().max() <= V / (2 * T) + 1e-12


@pytest.mark.parametrize("T", STEPS)
def test_if_saturation(T):
    V = 1.5
    high = torch.full((T, 5, 3), 1.0, dtype=torch.float64) * torch.tensor([V, V + 0.1, 10.0], dtype=torch.float64)
    low = -random_input(T, (5, 3), seed=3, scale=2.0, shift=0.0)
    neuron = DSRIF(T, vth=V)
    assert torch.equal(rate(neuron(fold_time(high)), T), torch.full((5, 3), V, dtype=torch.float64))
    assert torch.equal(rate(neuron(fold_time(low)), T), torch.zeros(5, 3, dtype=torch.float64))


@pytest.mark.parametrize("T", STEPS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("grad_scale", [1.0, 1e-3])
def test_if_backward_equals_formulas(T, shape, grad_scale):
    V = 2.0
    x = random_input(T, shape, seed=7 * T).requires_grad_(True)
    g = random_input(T, shape, seed=11 * T, scale=2.0, shift=-1.0)
    neuron = DSRIF(T, vth=V, vth_grad_scale=grad_scale)
    y = neuron(fold_time(x))
    y.backward(fold_time(g))
    G = g.sum(0)
    xbar = x.detach().mean(0)
    expected_dx = (G / T) * ((xbar >= 0) & (xbar <= V)).double()
    expected_dv = grad_scale * (G * (xbar > V).double()).sum()
    torch.testing.assert_close(x.grad, expected_dx.expand(T, *shape), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(neuron.vth.grad.double(), expected_dv, rtol=1e-6, atol=1e-9)


def test_if_backward_interval_is_closed():
    """xbar exactly 0 and exactly V are inside the gradient interval; just outside are not."""
    T, V = 4, 1.0
    xbar = torch.tensor([0.0, V, -1e-9, V + 1e-9], dtype=torch.float64)
    x = xbar.expand(T, 4).clone().requires_grad_(True)
    neuron = DSRIF(T, vth=V)
    neuron(fold_time(x)).sum().backward()
    assert x.grad[0].tolist() == [1.0, 1.0, 0.0, 0.0]  # G/T = T/T


@pytest.mark.parametrize("T", [1, 2, 5])
def test_linear_into_if_gives_ann_gradient_on_representations(T):
    """dL/dW = ((dL/da) * m)^T @ rbar with m = 1[0 <= zbar <= V] (DSR.md section 6, property 5)."""
    torch.manual_seed(0)
    B, n_in, n_out, V = 6, 5, 4, 1.0
    spikes_in = (torch.rand(T, B, n_in, dtype=torch.float64) < 0.5).double()
    linear = torch.nn.Linear(n_in, n_out).double()
    neuron = DSRIF(T, vth=V)
    c = torch.randn(B, n_out, dtype=torch.float64)
    a = rate(neuron(linear(fold_time(spikes_in))), T)
    (a * c).sum().backward()
    rbar = spikes_in.mean(0)
    zbar = linear(rbar).detach()
    m = ((zbar >= 0) & (zbar <= V)).double()
    torch.testing.assert_close(linear.weight.grad, (c * m).T @ rbar, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(linear.bias.grad, (c * m).sum(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T", STEPS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tau,dt,V,alpha", [(1.0, 0.05, 0.3, 0.3), (1.0, 0.1, 0.6, 0.5), (2.0, 0.5, 1.0, 1.0)])
def test_lif_forward_matches_reference(T, shape, tau, dt, V, alpha):
    x = random_input(T, shape, seed=T, scale=20.0, shift=-4.0)
    neuron = DSRLIF(T, vth=V, alpha=alpha, tau=tau, dt=dt)
    V = neuron.vth.item()  # the float32 parameter's exact value
    y = neuron(fold_time(x))
    assert y.shape == fold_time(x).shape
    assert set(y.unique().tolist()) <= {0.0, V / dt}
    expected, u_T = reference_lif(x, V, alpha, tau, dt)
    torch.testing.assert_close(unfold_time(y, T), expected, rtol=0, atol=0)
    # identity: a = ((1-beta)/dt) * xhat - u_T / (W*dt)
    w = lif_weights(T, tau, dt)
    W = w.sum()
    xhat = torch.tensordot(w, x, dims=([0], [0])) / W
    beta = math.exp(-dt / tau)
    torch.testing.assert_close(neuron.decode(y), ((1 - beta) / dt) * xhat - u_T / (W * dt), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("T", STEPS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tau,dt,V", [(1.0, 0.05, 0.3), (2.0, 0.5, 1.0)])
def test_lif_backward_equals_formulas(T, shape, tau, dt, V):
    grad_scale = 0.5
    x = random_input(T, shape, seed=5 * T, scale=3 * V * tau / dt, shift=-V * tau / dt).requires_grad_(True)
    g = random_input(T, shape, seed=13 * T, scale=2.0, shift=-1.0)
    neuron = DSRLIF(T, vth=V, tau=tau, dt=dt, vth_grad_scale=grad_scale)
    V = neuron.vth.item()
    neuron(fold_time(x)).backward(fold_time(g))
    w = lif_weights(T, tau, dt)
    W = w.sum()
    G = T * torch.tensordot(w, g, dims=([0], [0])) / W
    xhat = torch.tensordot(w, x.detach(), dims=([0], [0])) / W
    upper = V * tau / dt
    expected_dx = (G / (tau * T)) * ((xhat > 0) & (xhat < upper)).double()
    expected_dv = grad_scale * dt * (G * (xhat > upper).double()).sum()
    torch.testing.assert_close(x.grad, expected_dx.expand(T, *shape), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(neuron.vth.grad.double(), expected_dv, rtol=1e-6, atol=1e-9)


def test_lif_backward_interval_is_open():
    T, V, tau, dt = 3, 0.5, 1.0, 0.1
    V = torch.tensor(V).item()  # the float32 threshold's exact value
    upper = V * tau / dt
    xhat = torch.tensor([0.0, upper, 1e-6, upper - 1e-6], dtype=torch.float64)
    x = xhat.expand(T, 4).clone().requires_grad_(True)  # constant in t, so xhat is the constant
    DSRLIF(T, vth=V, tau=tau, dt=dt)(fold_time(x)).sum().backward()
    assert (x.grad[0] == 0).tolist() == [True, True, False, False]


@pytest.mark.parametrize("make", [lambda T: DSRIF(T), lambda T: DSRLIF(T)])
def test_threshold_is_clamped_to_bound_before_every_forward(make):
    neuron = make(3)
    bound = torch.tensor(neuron.vth_bound).item()  # the bound as a float32 parameter holds it
    for below in (1e-7, -5.0):
        with torch.no_grad():
            neuron.vth.fill_(below)
        neuron(torch.randn(6, 2))
        assert neuron.vth.item() == bound
    neuron.eval()
    with torch.no_grad():
        neuron.vth.fill_(-1.0)
        neuron(torch.randn(6, 2))
    assert neuron.vth.item() >= bound


@pytest.mark.parametrize("T", STEPS)
@pytest.mark.parametrize("tau,dt", [(1.0, 0.05), (1.0, 0.1), (2.0, 0.5)])
def test_decoding_weights_and_constant_sequences(T, tau, dt):
    w = decoding_weights(T, tau, dt, dtype=torch.float64)
    torch.testing.assert_close(w, lif_weights(T, tau, dt))
    assert w[-1].item() == 1.0
    assert (w[1:] > w[:-1]).all()
    c = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(weighted_rate(repeat_time(c, T), T, tau, dt), c)
    torch.testing.assert_close(rate(repeat_time(c, T), T), c)


@pytest.mark.parametrize("make", [lambda T: DSRIF(T, vth=1.0), lambda T: DSRLIF(T, vth=0.3)],
                         ids=["IF", "LIF"])
def test_saved_for_backward_is_constant_in_T_and_no_graph_through_time(make):
    """The neuron saves only the time-reduced input ([B, ...]) and the threshold, whatever T."""
    B, features = 8, (3, 4, 4)
    for T in (1, 5, 20):
        saved = []

        def pack(t, saved=saved):
            saved.append(t.numel())
            return t

        x = torch.randn(T * B, *features, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = make(T)(x)
        assert sum(saved) == B * 3 * 4 * 4 + 1, (T, saved)
        # one autograd node between input and output: the time loop recorded nothing
        assert "DSR" in type(y.grad_fn).__name__
        assert y.grad_fn.next_functions[0][0] is not None
        assert type(y.grad_fn.next_functions[0][0]).__name__ == "AccumulateGrad"


@pytest.mark.parametrize("kwargs,name", [
    (dict(T=0), "T"), (dict(T=2.5), "T"), (dict(T=2, vth=0.0), "vth"), (dict(T=2, vth=-1.0), "vth"),
    (dict(T=2, alpha=0.0), "alpha"), (dict(T=2, alpha=1.5), "alpha"), (dict(T=2, vth_bound=0.0), "vth_bound"),
])
def test_if_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DSRIF(**kwargs)


@pytest.mark.parametrize("kwargs,name", [(dict(T=2, dt=0.0), "dt"), (dict(T=2, dt=-0.1), "dt"),
                                         (dict(T=2, tau=0.0), "tau"), (dict(T=0), "T")])
def test_lif_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DSRLIF(**kwargs)


@pytest.mark.parametrize("neuron", [DSRIF(3), DSRLIF(3)])
def test_input_not_divisible_by_T(neuron):
    with pytest.raises(ValueError, match="divisible by T=3"):
        neuron(torch.randn(7, 2))


def test_untrained_threshold_gets_no_gradient():
    neuron = DSRIF(2, train_vth=False)
    x = torch.randn(4, 3, requires_grad=True)
    neuron(x).sum().backward()
    assert neuron.vth.grad is None and x.grad is not None


def test_bf16_input_integrates_in_float32():
    """bf16 input gives bf16 spikes identical to integrating the same (bf16-rounded) values in float32;
    accumulating 0.01 in bf16 itself would round the small steps away (ulp 2^-9 near 0.25)."""
    T = 200
    x16 = torch.full((T * 2, 3), 0.01, dtype=torch.bfloat16)
    y16 = DSRIF(T, vth=1.0)(x16)
    y32 = DSRIF(T, vth=1.0)(x16.float())
    assert y16.dtype == torch.bfloat16
    assert torch.equal(y16.float(), y32)
    assert rate(y32, T)[0, 0].item() > 0
