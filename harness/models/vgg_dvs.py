"""VGG-11 for DVS-CIFAR10 (DSR.md section 4), as a plain ANN registered in timm.

Contract: `timm.create_model("vgg11_dvs", num_classes=..., in_chans=..., act_layer=..., drop_rate=...)`
builds the ANN form for one event frame `[N, 2, 48, 48]` (polarity channels); the SNN wrapper folds the
T frames of a sample into the batch, time-major, before calling it. Every activation is its own module
made by `act_layer()` and is called once per forward; pooling is average pooling only.

Stages [64, M], [128, M], [256, 256, M], [512, 512, M], [512, 512, M], each number a unit
`conv3x3(bias) -> BN -> act -> Dropout(drop_rate)` and M = AvgPool2d(2). Head:
`AdaptiveAvgPool2d(7) -> flatten -> Linear(512*7*7, classes) -> BatchNorm1d(classes) -> act`.
8 conv units + 1 output = 9 spiking layers. At 48x48 the last stage gives 1x1 maps, which the
adaptive pool repeats to 7x7, as in the reference code.
"""

import torch
from timm.layers import get_act_layer
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

__all__ = ["ConvUnit", "VggDvs"]

VGG11_STAGES = ((64,), (128,), (256, 256), (512, 512), (512, 512))
HEAD_POOL_SIZE = 7


class ConvUnit(nn.Module):
    """`conv3x3(bias) -> BN -> act -> dropout`, one spiking layer of the DVS VGG.

    Args:
        in_chs (int): input channels.
        out_chs (int): output channels.
        act_layer (type[nn.Module]): activation class.
        drop_rate (float): dropout after the activation.
    """

    def __init__(self, in_chs: int, out_chs: int, act_layer: type[nn.Module] = nn.ReLU, drop_rate: float = 0.1):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size=3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = act_layer()
        self.drop = nn.Dropout(drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.act(self.bn(self.conv(x))))


class VggDvs(nn.Module):
    """VGG with average pooling and a spiking output layer (DSR.md section 4).

    Args:
        stages (tuple[tuple[int, ...], ...]): output channels of the conv units of each stage; every stage
            ends with AvgPool2d(2).
        num_classes (int): output classes.
        in_chans (int): input channels (2 polarities for DVS frames).
        act_layer (type[nn.Module] | str): activation class, or a timm name such as 'relu'.
        drop_rate (float): dropout after every conv unit's activation.
    """

    def __init__(
        self,
        stages: tuple[tuple[int, ...], ...] = VGG11_STAGES,
        num_classes: int = 10,
        in_chans: int = 2,
        act_layer: type[nn.Module] | str = nn.ReLU,
        drop_rate: float = 0.1,
    ):
        super().__init__()
        act_layer = get_act_layer(act_layer)
        self.num_classes = num_classes
        self.num_features = stages[-1][-1]

        layers = []
        in_chs = in_chans
        for widths in stages:
            for out_chs in widths:
                layers.append(ConvUnit(in_chs, out_chs, act_layer=act_layer, drop_rate=drop_rate))
                in_chs = out_chs
            layers.append(nn.AvgPool2d(kernel_size=2, stride=2))
        self.features = nn.Sequential(*layers)

        self.pool = nn.AdaptiveAvgPool2d(HEAD_POOL_SIZE)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(self.num_features * HEAD_POOL_SIZE**2, num_classes)
        self.fc_bn = nn.BatchNorm1d(num_classes)
        self.fc_act = act_layer()
        self._init_weights()

    def _init_weights(self) -> None:
        """Kaiming-normal (fan_out) convs, N(0, 0.01) classifier, zero biases: the reference initialisation."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Conv stages: [N, in_chans, H, W] -> [N, 512, H/32, W/32]."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """pool(7) -> flatten [-> fc -> BN1d -> act unless `pre_logits`]."""
        x = self.flatten(self.pool(x))
        if pre_logits:
            return x
        return self.fc_act(self.fc_bn(self.fc(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_vgg_dvs(variant: str, pretrained: bool = False, **kwargs) -> VggDvs:
    return build_model_with_cfg(VggDvs, variant, pretrained, **kwargs)


default_cfgs = generate_default_cfgs({
    "vgg11_dvs": {
        "url": "", "num_classes": 10, "input_size": (2, 48, 48), "pool_size": (1, 1),
        "crop_pct": 1.0, "interpolation": "bilinear", "mean": (0.0, 0.0), "std": (1.0, 1.0),
        "first_conv": "features.0.conv", "classifier": "fc",
    },
})


@register_model
def vgg11_dvs(pretrained: bool = False, **kwargs) -> VggDvs:
    """VGG-11 for 48x48 two-polarity DVS-CIFAR10 frames, 9 activations (DSR.md section 4)."""
    return _create_vgg_dvs("vgg11_dvs", pretrained, stages=VGG11_STAGES, **kwargs)
