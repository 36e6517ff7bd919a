"""Tests of the timm-registered backbones in harness.models against DSR.md section 4.

What a spiking wrapper relies on: every activation is its own module made from `act_layer`, called exactly
once per forward, with no hidden functional nonlinearity and no max pooling; plus exact parameter counts
of the reference topologies, worked out by hand below.
"""

import pytest
import timm
import torch
from torch import nn

import harness.models  # noqa: F401  (registers the models)

# name -> (input shape of one sample used in the tests, activation modules in the network)
MODELS = {
    "preact_resnet18_cifar": ((3, 32, 32), 19),  # 2 per block x 8 blocks + 3 in the head
    "preact_resnet18": ((3, 64, 64), 20),  # stem 1 + 2 x 8 blocks + head 3
    "preact_resnet34": ((3, 64, 64), 36),  # stem 1 + 2 x 16 blocks + head 3
    "vgg11_dvs": ((2, 48, 48), 9),  # 8 conv units + output layer
    "snn_convnet": ((1, 28, 28), 3),  # 2 conv stages + output layer
}
BATCH = 2
NUM_CLASSES = 5


class LinearAct(nn.Identity):
    """A marker activation that is the identity: with it (and BN, dropout in eval) a backbone is affine."""


def _activations(model: nn.Module, act_cls: type[nn.Module]) -> list[tuple[str, nn.Module]]:
    """Every registration of an `act_cls` module, duplicates included."""
    return [(name, m) for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, act_cls)]


def _create(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=NUM_CLASSES, **kwargs)


def _input(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, *shape, generator=generator, dtype=dtype)


def test_registered_in_timm():
    assert set(timm.list_models("preact_*")) >= {"preact_resnet18_cifar", "preact_resnet18", "preact_resnet34"}
    assert set(MODELS) <= set(timm.list_models())


@pytest.mark.parametrize(
    "name, shape",
    [(name, shape) for name, (shape, _) in MODELS.items()]
    + [("preact_resnet18", (3, 224, 224)), ("snn_convnet", (1, 8, 8))],
)
def test_forward_shape(name, shape):
    model = _create(name, in_chans=shape[0]).train()
    logits = model(_input(shape))
    assert logits.shape == (BATCH, NUM_CLASSES)
    assert torch.isfinite(logits).all()
    assert model.num_classes == NUM_CLASSES


def test_default_cfgs():
    cifar = timm.create_model("preact_resnet18_cifar")
    assert cifar.num_classes == 10 and cifar.pretrained_cfg["input_size"] == (3, 32, 32)
    assert timm.create_model("preact_resnet34").num_classes == 1000
    assert timm.create_model("vgg11_dvs").pretrained_cfg["input_size"] == (2, 48, 48)
    assert timm.create_model("snn_convnet").default_cfg["input_size"] == (1, 28, 28)


def test_cifar_normalisation_is_the_loaders():
    from harness.data.cifar import CIFAR10_MEAN, CIFAR10_STD

    cfg = timm.create_model("preact_resnet18_cifar").pretrained_cfg
    assert (tuple(cfg["mean"]), tuple(cfg["std"])) == (CIFAR10_MEAN, CIFAR10_STD) == (
        (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))  # the reference code's values (harness/data/cifar.py)


def conv_params(in_chs: int, out_chs: int, kernel: int, bias: bool) -> int:
    return in_chs * out_chs * kernel * kernel + (out_chs if bias else 0)


def bn_params(channels: int) -> int:
    return 2 * channels  # weight + bias; running mean/var are buffers


def linear_params(in_features: int, out_features: int) -> int:
    return in_features * out_features + out_features


def test_param_count_preact_resnet18_cifar():
    # CIFAR reference: block convs and the 1x1 shortcut conv carry a bias, the shortcut has no BN,
    # the stem conv has no bias.
    def block(in_chs, out_chs):
        n = bn_params(in_chs) + conv_params(in_chs, out_chs, 3, True)
        n += bn_params(out_chs) + conv_params(out_chs, out_chs, 3, True)
        if in_chs != out_chs:
            n += conv_params(in_chs, out_chs, 1, True)
        return n

    # block(64, 64) = 128 + 36,928 + 128 + 36,928                        = 74,112
    # block(64, 128) = 128 + 73,856 + 256 + 147,584 + 8,320 (shortcut)    = 230,144
    # block(128, 128) = 295,680; block(128, 256) = 919,040; block(256, 256) = 1,181,184
    # block(256, 512) = 3,673,088; block(512, 512) = 4,721,664
    expected = (
        conv_params(3, 64, 3, False)  # stem 3*64*9 = 1,728
        + block(64, 64) + block(64, 64)  # 148,224
        + block(64, 128) + block(128, 128)  # 525,824
        + block(128, 256) + block(256, 256)  # 2,100,224
        + block(256, 512) + block(512, 512)  # 8,394,752
        + bn_params(512)  # final BN 1,024
        + linear_params(512, 10)  # 5,130
        + bn_params(10)  # BatchNorm1d 20
    )
    assert expected == 11_176_926
    model = timm.create_model("preact_resnet18_cifar", num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_param_count_preact_resnet34():
    # ImageNet reference: no conv biases; the 1x1 downsample conv is followed by BN.
    def block(in_chs, out_chs):
        n = bn_params(in_chs) + conv_params(in_chs, out_chs, 3, False)
        n += bn_params(out_chs) + conv_params(out_chs, out_chs, 3, False)
        if in_chs != out_chs:
            n += conv_params(in_chs, out_chs, 1, False) + bn_params(out_chs)
        return n

    # block(64, 64) = 128 + 36,864 + 128 + 36,864                          = 73,984
    # block(64, 128) = 128 + 73,728 + 256 + 147,456 + 8,192 + 256           = 230,016
    # block(128, 128) = 295,424; block(128, 256) = 918,784; block(256, 256) = 1,180,672
    # block(256, 512) = 3,672,576; block(512, 512) = 4,720,640
    expected = (
        conv_params(3, 64, 7, False) + bn_params(64)  # stem 9,408 + 128 = 9,536
        + 3 * block(64, 64)  # 221,952
        + block(64, 128) + 3 * block(128, 128)  # 1,116,288
        + block(128, 256) + 5 * block(256, 256)  # 6,822,144
        + block(256, 512) + 2 * block(512, 512)  # 13,113,856
        + bn_params(512)  # final BN 1,024
        + linear_params(512, 1000)  # 513,000
        + bn_params(1000)  # BatchNorm1d 2,000
    )
    assert expected == 21_799_800
    model = timm.create_model("preact_resnet34", num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("name", list(MODELS))
def test_activation_modules_distinct_and_counted(name):
    _, expected_count = MODELS[name]
    acts = _activations(_create(name), nn.ReLU)
    assert len(acts) == expected_count
    assert len({id(m) for _, m in acts}) == expected_count


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("act_layer, act_cls", [(nn.GELU, nn.GELU), ("relu", nn.ReLU), ("silu", nn.SiLU)])
def test_act_layer_passes_through(name, act_layer, act_cls):
    model = _create(name, act_layer=act_layer)
    assert len(_activations(model, act_cls)) == MODELS[name][1]
    if act_cls is not nn.ReLU:
        assert not _activations(model, nn.ReLU)


@pytest.mark.parametrize("name", list(MODELS))
def test_average_pooling_only(name):
    max_pools = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
    assert not any(isinstance(m, max_pools) for m in _create(name).modules())


@pytest.mark.parametrize("name", list(MODELS))
def test_each_activation_called_once_per_forward(name):
    shape, expected_count = MODELS[name]
    model = _create(name, in_chans=shape[0], act_layer=LinearAct).train()
    calls = {}
    for act_name, act in _activations(model, LinearAct):
        act.register_forward_hook(lambda module, args, output, key=act_name: calls.update({key: calls.get(key, 0) + 1}))
    model(_input(shape))
    assert len(calls) == expected_count
    assert set(calls.values()) == {1}


@pytest.mark.parametrize("name", list(MODELS))
def test_no_hidden_nonlinearity(name):
    # With identity activations and BN/dropout in eval mode, conv, BN, average pooling and Linear are all
    # affine, so the network is affine: f((x + y) / 2) == (f(x) + f(y)) / 2. A functional relu, a max pool
    # or any other nonlinearity outside the act_layer modules would break this.
    shape, _ = MODELS[name]
    model = _create(name, in_chans=shape[0], act_layer=LinearAct).double().eval()
    x, y = _input(shape, torch.float64), -2.0 * _input(shape, torch.float64).flip(0)
    with torch.no_grad():
        midpoint, mean_of_outputs = model((x + y) / 2), (model(x) + model(y)) / 2
    torch.testing.assert_close(midpoint, mean_of_outputs, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["preact_resnet18_cifar", "preact_resnet18"])
def test_shortcut_takes_post_activation_input(name):
    model = _create(name)
    block = model.stages[1][0]  # first block of stage 2: a 1x1 conv shortcut
    seen = {}
    block.act1.register_forward_hook(lambda module, args, output: seen.update(act1_out=output))
    block.shortcut.register_forward_pre_hook(lambda module, args: seen.update(shortcut_in=args[0]))
    model(_input(MODELS[name][0]))
    assert seen["shortcut_in"] is seen["act1_out"]
