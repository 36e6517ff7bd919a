"""The fused DSR neuron against the plain reference loop (harness/snn/kernels).

Spikes are thresholded, so the fused kernels must give the same spikes bit for bit on the same device and dtype
(they reproduce the reference's roundings), and the same representations; the gradients sum over T in another
order and agree to float round-off: relative 1e-6 in float32 (T <= 8 additions of O(1) terms), one bf16 step
(at most 2^-7 relative) for bf16 gradients. Inputs include T=1, sizes that are not a multiple of the kernels' blocks or
of one thread's share, both dtypes the engine uses, and a channels-last layout. The Triton kernels run in
Triton's interpreter on the CPU (no GPU here); `bench/gpu_check.sh` runs the same comparison on CUDA.
"""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.snn import DSRIF, DSRLIF, kernels
from harness.snn.kernels import KernelError, reference

NEURONS = {"if": DSRIF, "lif": DSRLIF}
# [B, ...] per step: tiny, ragged (not a multiple of the 2048-element block), and larger than one thread's share
SHAPES = [(3,), (5, 3, 11, 13), (2, 16384 + 4097)]
TOLERANCE = {torch.float32: dict(rtol=1e-6, atol=1e-7), torch.bfloat16: dict(rtol=2**-7, atol=1e-6),
             torch.float64: dict(rtol=1e-12, atol=1e-15)}


def run(neuron_cls, kernel: str, x: torch.Tensor, grad: torch.Tensor, T: int, **kwargs):
    torch.manual_seed(0)
    neuron = neuron_cls(T, **kwargs).to(x.device)
    leaf = x.clone().requires_grad_()
    with kernels.using(kernel):
        y = neuron(leaf)
        y.backward(grad)
    return y.detach(), leaf.grad, neuron.vth.grad


def random_case(T: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn((T * shape[0], *shape[1:]), generator=g) * 3).to(dtype)
    grad = torch.randn(x.shape, generator=g).to(dtype)
    return x, grad


@pytest.mark.parametrize("name,T,shape,dtype", list(itertools.product(
    NEURONS, [1, 3, 8], SHAPES, [torch.float32, torch.bfloat16, torch.float64])))
def test_fused_cpu_matches_plain(name, T, shape, dtype):
    x, grad = random_case(T, shape, dtype, seed=T)
    kwargs = {"vth": 1.0} if name == "if" else {}  # a threshold the N(0, 9) inputs cross often
    y_plain, gx_plain, gv_plain = run(NEURONS[name], "plain", x, grad, T, **kwargs)
    y_fused, gx_fused, gv_fused = run(NEURONS[name], "fused", x, grad, T, **kwargs)
    assert y_plain.count_nonzero() > 0 and (y_plain == 0).any()  # both sides of the threshold are exercised
    assert torch.equal(y_fused, y_plain)
    assert y_fused.dtype == dtype
    torch.testing.assert_close(gx_fused, gx_plain, **TOLERANCE[dtype])
    torch.testing.assert_close(gv_fused, gv_plain, rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=1e-6)


@pytest.mark.parametrize("name", NEURONS)
def test_fused_representations_match_plain(name):
    """The representation mode's spiking pass records xbar / xhat from the same loop: equal, not just close."""
    x, _ = random_case(4, (6, 7, 9), torch.float32, seed=1)
    out = {}
    for kernel in ("plain", "fused"):
        neuron = NEURONS[name](4)
        with kernels.using(kernel), torch.no_grad():
            out[kernel] = neuron.spike_and_represent(x)
    for plain, fused in zip(out["plain"], out["fused"], strict=True):
        assert torch.equal(plain, fused)


@pytest.mark.parametrize("name", NEURONS)
def test_fused_keeps_channels_last(name):
    x, grad = random_case(4, (3, 5, 6, 7), torch.float32, seed=2)
    x = x.contiguous(memory_format=torch.channels_last)
    y_plain, gx_plain, _ = run(NEURONS[name], "plain", x, grad, 4)
    y_fused, gx_fused, _ = run(NEURONS[name], "fused", x, grad, 4)
    assert y_fused.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y_fused, y_plain)
    torch.testing.assert_close(gx_fused, gx_plain, rtol=1e-6, atol=1e-6)


def test_non_dense_input_is_made_contiguous():
    x, grad = random_case(2, (4, 6), torch.float32, seed=3)
    strided = x.t().contiguous().t()  # the same values, column-major
    assert not strided.is_contiguous()
    assert torch.equal(run(DSRIF, "fused", strided, grad, 2)[0], run(DSRIF, "plain", x, grad, 2)[0])


def test_choice_is_validated_and_restored():
    with pytest.raises(KernelError, match="engine.neuron_kernel: 'fast' is not one of auto, plain, fused"):
        kernels.select("fast")
    before = kernels.selected()
    with kernels.using("plain"):
        assert kernels.selected() == "plain"
    assert kernels.selected() == before


def test_fused_where_it_cannot_run_is_one_line_and_auto_falls_back(monkeypatch):
    monkeypatch.setitem(kernels._status, "cpu", (False, "the C++ extension did not build (no compiler)"))
    x, grad = random_case(2, (3, 4), torch.float32, seed=4)
    with kernels.using("fused"), pytest.raises(KernelError) as failure:
        kernels.check_selected("cpu")
    assert str(failure.value) == ("engine.neuron_kernel: fused cannot run on cpu: the C++ extension did not build "
                                  "(no compiler); use auto or plain")
    called, plain_if = [], reference.if_forward
    monkeypatch.setattr(reference, "if_forward", lambda *a: called.append(1) or plain_if(*a))
    with kernels.using("auto"):
        DSRIF(2)(x)
    assert called == [1]


def test_custom_operators_pass_opcheck():
    """Schema, fake (shape) functions and dispatch of the operators `torch.compile` traces through."""
    x, grad = random_case(3, (4, 5), torch.float32, seed=5)
    v = torch.tensor(1.0)
    xbar = x.view(3, 4, 5).mean(0)
    w = torch.tensor([0.5, 0.7, 1.0])
    torch.library.opcheck(kernels._if_forward_op, (x, v, 0.5 * v, 3))
    torch.library.opcheck(kernels._lif_forward_op, (x, v, 0.5 * v, v / 0.05, w, w.sum(), 3, 0.95, 0.05))
    torch.library.opcheck(kernels._if_backward_op, (grad, xbar, v, 3))
    torch.library.opcheck(kernels._lif_backward_op, (grad, xbar, v * 20, w, 3, 1.0, 2.2))


def test_compiled_neuron_matches_eager():
    x, grad = random_case(4, (3, 8, 5, 5), torch.float32, seed=6)
    torch._dynamo.reset()
    neuron = DSRLIF(4)
    compiled = torch.compile(neuron, fullgraph=True, dynamic=False)
    with kernels.using("fused"):
        assert torch.equal(compiled(x), neuron(x))


TRITON_CHECK = r"""
import itertools, math, sys, torch
from harness.snn.coding import decoding_weights
from harness.snn.kernels import reference, triton_neuron
lif_spikes = 0
tol = {torch.float32: dict(rtol=1e-6, atol=1e-7), torch.bfloat16: dict(rtol=2**-7, atol=1e-6)}
for T, shape, dtype in itertools.product([1, 3, 8], [(3,), (5, 3, 7, 9), (2, 1500)], [torch.float32, torch.bfloat16]):
    g = torch.Generator().manual_seed(T)
    x = (torch.randn((T * shape[0], *shape[1:]), generator=g) * 3).to(dtype)
    grad = torch.randn(x.shape, generator=g).to(dtype)
    v = torch.tensor(1.0); tau, dt = 1.0, 0.05; beta = math.exp(-dt / tau)
    w = decoding_weights(T, tau, dt, dtype=torch.float32); w_sum = math.fsum(w.double().tolist())
    a, b = reference.if_forward(x, v, 0.5 * v, T), triton_neuron.if_forward(x, v, 0.5 * v, T)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[0].count_nonzero() > 0, ("if", T, shape, dtype)
    a = reference.lif_forward(x, v, 0.3 * v, v / dt, w, w.sum(), T, beta, 1 - beta)
    b = triton_neuron.lif_forward(x, v, 0.3 * v, v / dt, w, w.sum(), T, beta, 1 - beta)
    assert torch.equal(a[0], b[0]), ("lif", T, shape, dtype)
    lif_spikes += a[0].count_nonzero().item()
    torch.testing.assert_close(b[1], a[1], rtol=1e-6, atol=1e-6)
    rep = a[1]
    for ref, fused in [(reference.if_backward(grad, rep, v, T), triton_neuron.if_backward(grad, rep, v, T)),
                       (reference.lif_backward(grad, rep, v * 20, w, T, tau, w_sum),
                        triton_neuron.lif_backward(grad, rep, v * 20, w, T, tau, w_sum))]:
        torch.testing.assert_close(fused[0], ref[0], **tol[dtype])
        torch.testing.assert_close(fused[1], ref[1], rtol=1e-5, atol=1e-6)
assert lif_spikes > 0
print("triton kernels agree")
"""


def test_triton_kernels_match_plain_in_the_interpreter():
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "triton kernels agree" in done.stdout


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh runs it)")


@CUDA
@pytest.mark.parametrize("name,T,shape,dtype", list(itertools.product(
    NEURONS, [1, 3, 8], SHAPES, [torch.float32, torch.bfloat16])))
def test_fused_cuda_matches_plain_cuda(name, T, shape, dtype):
    x, grad = random_case(T, shape, dtype, seed=T)
    x, grad = x.cuda(), grad.cuda()
    kwargs = {"vth": 1.0} if name == "if" else {}
    y_plain, gx_plain, gv_plain = run(NEURONS[name], "plain", x, grad, T, **kwargs)
    y_fused, gx_fused, gv_fused = run(NEURONS[name], "fused", x, grad, T, **kwargs)
    assert torch.equal(y_fused, y_plain)
    torch.testing.assert_close(gx_fused, gx_plain, **TOLERANCE[dtype])
    torch.testing.assert_close(gv_fused, gv_plain, rtol=1e-5, atol=1e-6)
