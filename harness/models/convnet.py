"""A small CNN for single-channel digits (28x28 MNIST, 8x8 sklearn digits), registered in timm.

Not from the paper: the quick-start backbone, sized so that an epoch over the 5,000-image MNIST subset
takes seconds on two CPU cores. It follows the DSR conventions of section 4 in DSR.md (average pooling
only, output layer `Linear -> BatchNorm1d(classes) -> act`), so every method can spikify it.

Contract: `timm.create_model("snn_convnet", num_classes=..., in_chans=..., act_layer=..., drop_rate=...)`
builds the ANN form. Every activation is its own module made by `act_layer()`, called once per forward.

    [N, in_chans, H, W]
    -> conv3x3(in_chans, w1) -> BN -> act -> AvgPool2d(2)
    -> conv3x3(w1, w2)       -> BN -> act -> AvgPool2d(2)
    -> AdaptiveAvgPool2d(pooled_size) -> flatten -> drop -> Linear -> BatchNorm1d(classes) -> act

The adaptive pool makes the classifier independent of H, W: 28x28 reaches it as 7x7, 8x8 as 2x2.
3 activations.
"""

from collections import OrderedDict

import torch
from timm.layers import get_act_layer
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

__all__ = ["ConvNet"]


class ConvNet(nn.Module):
    """Two conv-BN-act-avgpool stages and a spiking-ready classifier.

    Args:
        num_classes (int): output classes.
        in_chans (int): input channels.
        widths (tuple[int, int]): output channels of the two convs.
        pooled_size (int): side of the feature map fed to the classifier.
        act_layer (type[nn.Module] | str): activation class, or a timm name such as 'relu'.
        drop_rate (float): dropout before the classifier.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        widths: tuple[int, int] = (16, 32),
        pooled_size: int = 4,
        act_layer: type[nn.Module] | str = nn.ReLU,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        act_layer = get_act_layer(act_layer)
        self.num_classes = num_classes
        self.num_features = widths[1] * pooled_size**2

        self.features = nn.Sequential(OrderedDict(
            conv1=nn.Conv2d(in_chans, widths[0], kernel_size=3, padding=1, bias=False),
            bn1=nn.BatchNorm2d(widths[0]),
            act1=act_layer(),
            pool1=nn.AvgPool2d(2),
            conv2=nn.Conv2d(widths[0], widths[1], kernel_size=3, padding=1, bias=False),
            bn2=nn.BatchNorm2d(widths[1]),
            act2=act_layer(),
            pool2=nn.AvgPool2d(2),
        ))
        self.pool = nn.AdaptiveAvgPool2d(pooled_size)
        self.flatten = nn.Flatten(1)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes)
        self.fc_bn = nn.BatchNorm1d(num_classes)
        self.fc_act = act_layer()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Conv stages: [N, in_chans, H, W] -> [N, w2, H/4, W/4]."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """pool -> flatten -> drop [-> fc -> BN1d -> act unless `pre_logits`]."""
        x = self.head_drop(self.flatten(self.pool(x)))
        if pre_logits:
            return x
        return self.fc_act(self.fc_bn(self.fc(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_convnet(variant: str, pretrained: bool = False, **kwargs) -> ConvNet:
    return build_model_with_cfg(ConvNet, variant, pretrained, **kwargs)


default_cfgs = generate_default_cfgs({
    "snn_convnet": {
        "url": "", "num_classes": 10, "input_size": (1, 28, 28), "pool_size": (4, 4),
        "crop_pct": 1.0, "interpolation": "bilinear", "mean": (0.1307,), "std": (0.3081,),
        "first_conv": "features.conv1", "classifier": "fc",
    },
})


@register_model
def snn_convnet(pretrained: bool = False, **kwargs) -> ConvNet:
    """Small CNN for 28x28 or 8x8 single-channel digits, 3 activations."""
    return _create_convnet("snn_convnet", pretrained, **kwargs)
