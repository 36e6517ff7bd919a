"""Backbones registered in timm's model registry (DSR.md section 4); importing this package registers them.

Names: preact_resnet18_cifar, preact_resnet18, preact_resnet34, vgg11_dvs, snn_convnet. Build one with
`timm.create_model(name, num_classes=..., in_chans=..., act_layer=...)`; each is a plain ANN whose every
activation is its own module, ready for `harness.snn.spikify`.
"""

from .convnet import ConvNet
from .preact_resnet import PreActBasicBlock, PreActResNet
from .vgg_dvs import ConvUnit, VggDvs

__all__ = ["ConvNet", "ConvUnit", "PreActBasicBlock", "PreActResNet", "VggDvs"]
