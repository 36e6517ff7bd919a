"""spikify: the ANN's activations become neurons, max pooling average pooling, time at both ends."""

import pytest
import timm
import torch
from torch import nn

import harness.models  # noqa: F401  (registers the backbones)
from harness.snn import DSRIF, DSRLIF, SpikingNet, spikify, weighted_rate


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(),
    )


def test_spikify_replaces_each_activation_and_max_pool():
    ann = small_cnn()
    snn = spikify(ann, lambda: DSRIF(T=3, vth=1.0), T=3)
    kinds = [type(m) for m in snn.body]
    assert kinds.count(DSRIF) == 3 and nn.ReLU not in kinds
    assert nn.AvgPool2d in kinds and nn.AdaptiveAvgPool2d in kinds
    assert not any(isinstance(m, (nn.MaxPool2d, nn.AdaptiveMaxPool2d)) for m in snn.modules())
    neurons = snn.neurons()
    assert len({id(n.vth) for n in neurons}) == 3  # one threshold per layer
    assert any(isinstance(m, nn.ReLU) for m in ann.modules())  # the ANN is left as it was


def test_spikify_keeps_weights_under_body_prefix():
    ann = small_cnn()
    snn = spikify(ann, lambda: DSRIF(T=2), T=2)
    for key, value in ann.state_dict().items():
        assert torch.equal(snn.state_dict()[f"body.{key}"], value)


def test_direct_encoding_and_rate_decoding():
    """The body sees the image at every step; the output is the rate of the last layer's spikes."""
    T = 4
    seen = []
    snn = spikify(small_cnn(), lambda: DSRIF(T=T, vth=1.0), T=T)
    snn.body[0].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    x = torch.randn(5, 1, 8, 8)
    out = snn(x)
    assert out.shape == (5, 3)
    steps = seen[0].view(T, 5, 1, 8, 8)
    assert all(torch.equal(steps[t], x) for t in range(T))
    last = snn.forward_steps(x)  # [T, B, classes]
    torch.testing.assert_close(out, last.mean(0))
    assert set((out * T / snn.neurons()[-1].vth.detach()).round().unique().tolist()) <= set(range(T + 1))


def test_lif_decodes_by_weighted_rate_and_sequence_encoding():
    T, tau, dt = 3, 1.0, 0.1
    snn = spikify(small_cnn(), lambda: DSRLIF(T=T, vth=0.3, tau=tau, dt=dt), T=T, encoding="sequence")
    frames = torch.randn(2, T, 1, 8, 8)
    out = snn(frames)
    steps = snn.forward_steps(frames)
    torch.testing.assert_close(out, weighted_rate(steps.flatten(0, 1), T, tau, dt))
    with pytest.raises(ValueError, match=r"\[B, T=3"):
        snn(torch.randn(2, 4, 1, 8, 8))


def test_spikify_without_activation_is_an_error():
    with pytest.raises(ValueError, match="no activation"):
        spikify(nn.Sequential(nn.Linear(2, 2)), lambda: DSRIF(T=2), T=2)


def test_neuron_factory_must_match_T():
    with pytest.raises(ValueError, match="T=2"):
        spikify(small_cnn(), lambda: DSRIF(T=3), T=2)


def _forward_backward_every_threshold_gets_gradient(snn: SpikingNet, x: torch.Tensor):
    snn.train()
    out = snn(x)
    assert torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.arange(x.shape[0]) % out.shape[1]).backward()
    missing = [i for i, n in enumerate(snn.neurons()) if n.vth.grad is None]
    assert not missing, f"neurons without a threshold gradient: {missing}"
    return out


def test_stock_timm_resnet18_spikifies():
    ann = timm.create_model("resnet18", num_classes=10)
    snn = spikify(ann, lambda: DSRIF(T=2, vth=1.0), T=2)
    assert not any(isinstance(m, (nn.ReLU, nn.MaxPool2d)) for m in snn.modules())
    assert len(snn.neurons()) == sum(isinstance(m, nn.ReLU) for m in ann.modules())
    out = _forward_backward_every_threshold_gets_gradient(snn, torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


BACKBONES = [
    ("preact_resnet18_cifar", dict(num_classes=10), (2, 3, 32, 32)),
    ("preact_resnet18", dict(num_classes=10), (2, 3, 64, 64)),
    ("preact_resnet34", dict(num_classes=10), (2, 3, 64, 64)),
    ("vgg11_dvs", dict(num_classes=10, in_chans=2), (2, 2, 48, 48)),
    ("snn_convnet", dict(num_classes=10, in_chans=1), (2, 1, 28, 28)),
    ("snn_convnet", dict(num_classes=10, in_chans=1), (2, 1, 8, 8)),
]


@pytest.mark.parametrize("name,kwargs,shape", BACKBONES, ids=[f"{b[0]}-{b[2][-1]}" for b in BACKBONES])
@pytest.mark.parametrize("neuron", ["if", "lif"])
def test_every_backbone_spikifies_and_trains_at_T2(name, kwargs, shape, neuron):
    torch.manual_seed(0)
    ann = timm.create_model(name, **kwargs)
    if neuron == "if":
        factory = lambda: DSRIF(T=2, vth=1.0)  # noqa: E731
    else:
        factory = lambda: DSRLIF(T=2, vth=0.3, dt=0.1)  # noqa: E731
    snn = spikify(ann, factory, T=2)
    assert len(snn.neurons()) == sum(isinstance(m, nn.ReLU) for m in ann.modules())
    assert not any(isinstance(m, nn.ReLU) for m in snn.modules())
    out = _forward_backward_every_threshold_gets_gradient(snn, torch.randn(*shape) * 3)
    assert out.shape == (shape[0], 10)
