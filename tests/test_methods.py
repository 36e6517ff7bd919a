"""Methods build on the same backbone; the ANN/sg/qcfs readout drops only the activation on the logits."""

import pytest
import timm
import torch
from torch import nn

import harness.models  # noqa: F401
from harness.methods import DataInfo, build
from harness.methods.base import drop_output_activation
from harness.recipe import ModelConfig, method_section


@pytest.mark.parametrize("name,shape", [("snn_convnet", (1, 28, 28)), ("preact_resnet18_cifar", (3, 32, 32)),
                                        ("vgg11_dvs", (2, 48, 48))])
def test_output_activation_is_dropped_and_logits_are_the_head_pre_activation(name, shape):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, in_chans=shape[0]).eval()
    relus = [n for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
    pre_activation = {}
    head = model.get_submodule(relus[-1].rpartition(".")[0] or "")
    bn1d = [m for m in head.modules() if isinstance(m, nn.BatchNorm1d)][-1]
    bn1d.register_forward_hook(lambda _m, _i, out: pre_activation.__setitem__("z", out))
    x = torch.randn(3, *shape)
    with torch.no_grad():
        relu_logits = model(x)
    drop_output_activation(model, shape)
    with torch.no_grad():
        logits = model(x)
    assert [n for n, m in model.named_modules() if isinstance(m, nn.ReLU)] == relus[:-1]
    assert torch.equal(logits, pre_activation["z"]) and torch.equal(relu_logits, logits.clamp(min=0))
    assert (logits < 0).any()


def test_stock_timm_model_ending_in_linear_is_unchanged():
    model = timm.create_model("resnet18", num_classes=10)
    before = [n for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
    drop_output_activation(model, (3, 32, 32))
    assert [n for n, m in model.named_modules() if isinstance(m, nn.ReLU)] == before


def test_ann_and_dsr_share_the_backbone_parameters():
    info = DataInfo(10, (1, 28, 28))
    ann = build(ModelConfig(), method_section({"name": "ann"}), info).model
    dsr = build(ModelConfig(), method_section({"name": "dsr", "T": 2}), info).model
    ann_keys = {k: v.shape for k, v in ann.state_dict().items()}
    dsr_keys = {k.removeprefix("body."): v.shape for k, v in dsr.state_dict().items() if ".vth" not in k}
    assert ann_keys == dsr_keys
