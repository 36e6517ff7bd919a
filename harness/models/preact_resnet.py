"""Pre-activation ResNets of DSR (DSR.md section 4), as plain ANNs registered in timm.

Contract: `timm.create_model(name, num_classes=..., in_chans=..., act_layer=..., drop_rate=...)` builds the
ANN form. Every activation is its own module made by `act_layer()` and is called exactly once per forward,
so `harness.snn.spikify` can swap each one for its own spiking neuron; pooling is average pooling only;
time never appears here (the SNN wrapper folds it into the batch).

Pre-activation basic block, with `x` the block input:
    x   = act1(bn1(x))
    out = conv2(drop(act2(bn2(conv1(x)))))
    out = out + shortcut(x)          # the shortcut sees the post-activation x
Head: `bn -> act -> avgpool -> act -> flatten -> drop -> fc -> BatchNorm1d(classes) -> act`: the output
layer is spiking too, and the logits are the decoded representation of its output.

Two flavours, following the authors' reference code:
- `cifar` (preact_resnet18_cifar, 32x32 input): 3x3 stem conv (no bias, no BN, no activation after it);
  block convs with bias; shortcut, when the shape changes, a 1x1 strided conv with bias and no BN; head
  pool AvgPool2d(4). 2 activations per block x 8 blocks + 3 in the head = 19 spiking layers.
- `imagenet` (preact_resnet18/34, 224x224 input): stem conv7x7/2 -> BN -> act -> AvgPool2d(3, 2, 1); convs
  without bias; shortcut, when the shape changes, 1x1 strided conv + BN; head pool global average.
  Activations: 1 + 2 * blocks + 3 (20 for ResNet-18, 36 for ResNet-34).
"""

from collections import OrderedDict

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import get_act_layer
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from harness.data.cifar import CIFAR10_MEAN, CIFAR10_STD  # the loaders' normalisation, one source

__all__ = ["PreActBasicBlock", "PreActResNet"]

WIDTHS = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)


def _make_shortcut(in_chs: int, out_chs: int, stride: int, conv_bias: bool, shortcut_norm: bool) -> nn.Module:
    """Identity when the shape is kept, else a 1x1 strided conv (followed by BN when `shortcut_norm`)."""
    if stride == 1 and in_chs == out_chs:
        return nn.Identity()
    conv = nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=conv_bias)
    if not shortcut_norm:
        return conv
    return nn.Sequential(OrderedDict(conv=conv, bn=nn.BatchNorm2d(out_chs)))


class PreActBasicBlock(nn.Module):
    """Pre-activation basic block; the shortcut takes the post-activation input (DSR.md section 4).

    Args:
        in_chs (int): input channels.
        out_chs (int): output channels.
        stride (int): stride of the first 3x3 conv and of the shortcut.
        act_layer (type[nn.Module]): activation class; two instances, `act1` and `act2`.
        conv_bias (bool): bias in the convs (True in the CIFAR reference, False in the ImageNet one).
        shortcut_norm (bool): BN after the 1x1 shortcut conv (ImageNet reference only).
        drop_rate (float): dropout between `act2` and `conv2`.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        act_layer: type[nn.Module] = nn.ReLU,
        conv_bias: bool = False,
        shortcut_norm: bool = True,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.act1 = act_layer()
        self.conv1 = nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=conv_bias)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = act_layer()
        self.drop = nn.Dropout(drop_rate)
        self.conv2 = nn.Conv2d(out_chs, out_chs, kernel_size=3, padding=1, bias=conv_bias)
        self.shortcut = _make_shortcut(in_chs, out_chs, stride, conv_bias, shortcut_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(x))
        out = self.conv1(x)
        out = self.conv2(self.drop(self.act2(self.bn2(out))))
        return out + self.shortcut(x)


class PreActResNet(nn.Module):
    """Pre-activation ResNet with a spiking-ready head (DSR.md section 4).

    Args:
        layers (tuple[int, int, int, int]): blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
        style (str): 'cifar' or 'imagenet': stem, conv biases, shortcut and head pool of that reference
            model (see the module docstring).
        num_classes (int): output classes.
        in_chans (int): input image channels.
        act_layer (type[nn.Module] | str): activation class, or a timm name such as 'relu'.
        drop_rate (float): dropout inside every block (before conv2) and before the classifier.
    """

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        style: str = "imagenet",
        num_classes: int = 1000,
        in_chans: int = 3,
        act_layer: type[nn.Module] | str = nn.ReLU,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        if style not in ("cifar", "imagenet"):
            raise ValueError(f"style must be 'cifar' or 'imagenet', got {style!r}")
        act_layer = get_act_layer(act_layer)
        cifar = style == "cifar"
        self.num_classes = num_classes
        self.num_features = WIDTHS[-1]

        if cifar:
            self.stem = nn.Sequential(OrderedDict(
                conv=nn.Conv2d(in_chans, WIDTHS[0], kernel_size=3, padding=1, bias=False),
            ))
        else:
            self.stem = nn.Sequential(OrderedDict(
                conv=nn.Conv2d(in_chans, WIDTHS[0], kernel_size=7, stride=2, padding=3, bias=False),
                bn=nn.BatchNorm2d(WIDTHS[0]),
                act=act_layer(),
                pool=nn.AvgPool2d(kernel_size=3, stride=2, padding=1),
            ))

        stages = []
        in_chs = WIDTHS[0]
        for num_blocks, out_chs, stride in zip(layers, WIDTHS, STAGE_STRIDES, strict=True):
            blocks = []
            for block_idx in range(num_blocks):
                blocks.append(PreActBasicBlock(
                    in_chs, out_chs, stride=stride if block_idx == 0 else 1, act_layer=act_layer,
                    conv_bias=cifar, shortcut_norm=not cifar, drop_rate=drop_rate,
                ))
                in_chs = out_chs
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)

        self.final_bn = nn.BatchNorm2d(self.num_features)
        self.final_act = act_layer()
        self.pool = nn.AvgPool2d(4) if cifar else nn.AdaptiveAvgPool2d(1)
        self.pool_act = act_layer()
        self.flatten = nn.Flatten(1)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes)
        self.fc_bn = nn.BatchNorm1d(num_classes)
        self.fc_act = act_layer()
        self._init_weights()

    def _init_weights(self) -> None:
        """Kaiming-normal (fan_out) convs, zero biases, BN at identity: the reference initialisation."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and residual stages: [N, in_chans, H, W] -> [N, 512, H/8 or H/32, ...]."""
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """bn -> act -> pool -> act -> flatten -> drop [-> fc -> BN1d -> act unless `pre_logits`]."""
        x = self.pool_act(self.pool(self.final_act(self.final_bn(x))))
        x = self.head_drop(self.flatten(x))
        if pre_logits:
            return x
        return self.fc_act(self.fc_bn(self.fc(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_preact_resnet(variant: str, pretrained: bool = False, **kwargs) -> PreActResNet:
    return build_model_with_cfg(PreActResNet, variant, pretrained, **kwargs)


def _cfg(**kwargs) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv", "classifier": "fc",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "preact_resnet18_cifar": _cfg(
        num_classes=10, input_size=(3, 32, 32), pool_size=(4, 4), crop_pct=1.0,
        mean=CIFAR10_MEAN, std=CIFAR10_STD,
    ),
    "preact_resnet18": _cfg(),
    "preact_resnet34": _cfg(),
})


@register_model
def preact_resnet18_cifar(pretrained: bool = False, **kwargs) -> PreActResNet:
    """PreAct-ResNet-18 for 32x32 CIFAR input, 19 activations (DSR.md section 4)."""
    return _create_preact_resnet("preact_resnet18_cifar", pretrained, layers=(2, 2, 2, 2), style="cifar", **kwargs)


@register_model
def preact_resnet18(pretrained: bool = False, **kwargs) -> PreActResNet:
    """PreAct-ResNet-18 for ImageNet, 20 activations (DSR.md section 4)."""
    return _create_preact_resnet("preact_resnet18", pretrained, layers=(2, 2, 2, 2), style="imagenet", **kwargs)


@register_model
def preact_resnet34(pretrained: bool = False, **kwargs) -> PreActResNet:
    """PreAct-ResNet-34 for ImageNet, 36 activations (DSR.md section 4)."""
    return _create_preact_resnet("preact_resnet34", pretrained, layers=(3, 4, 6, 3), style="imagenet", **kwargs)
