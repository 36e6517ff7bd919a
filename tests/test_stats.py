"""Spike statistics on a tiny fixed network and input, against counts worked out by hand.

The network (T = 2, IF neurons with V = 1, alpha = 0.5: a neuron fed 1 at every step spikes at every step):
    conv1 3x3 pad 1, 1 -> 2 channels (centre tap 1 into channel 0, else 0)  -> IF
    conv2 3x3 pad 1, 2 -> 2 channels (centre tap channel 0 -> 0, else 0)     -> IF
    flatten (18) -> linear 18 -> 3 (unit 0 reads channel 0, pixel (0, 0))    -> IF
Input: B = 2 images 3x3; the first has 1 at pixels (0,0), (1,1), (2,2), the second is all 0.
"""

import pytest
import torch
from torch import nn

from harness.snn import DSRIF, SpikingNet
from harness.snn.stats import FiringRateMonitor, fanout

T = 2


def tiny_snn() -> SpikingNet:
    conv1 = nn.Conv2d(1, 2, 3, padding=1, bias=False)
    conv2 = nn.Conv2d(2, 2, 3, padding=1, bias=False)
    fc = nn.Linear(18, 3, bias=False)
    with torch.no_grad():
        for layer in (conv1, conv2, fc):
            layer.weight.zero_()
        conv1.weight[0, 0, 1, 1] = 1.0
        conv2.weight[0, 0, 1, 1] = 1.0
        fc.weight[0, 0] = 1.0  # flattened index 0 = channel 0, pixel (0, 0)
    neuron = lambda: DSRIF(T, vth=1.0, alpha=0.5)  # noqa: E731
    body = nn.Sequential(conv1, neuron(), conv2, neuron(), nn.Flatten(), fc, neuron())
    return SpikingNet(body, T, body[-1].decode).eval()


def tiny_input() -> torch.Tensor:
    x = torch.zeros(2, 1, 3, 3)
    for i in range(3):
        x[0, 0, i, i] = 1.0
    return x


def test_conv_fanout_counts_output_positions_and_channels():
    """3x3 kernel, pad 1, 3x3 map, 2 output channels: a corner reaches 4 positions, an edge 6, the centre 9."""
    f = fanout(nn.Conv2d(1, 2, 3, padding=1), (1, 3, 3), torch.device("cpu"))
    assert f[0].tolist() == [[8, 12, 8], [12, 18, 12], [8, 12, 8]]
    strided = fanout(nn.Conv2d(1, 1, 2, stride=2), (1, 4, 4), torch.device("cpu"))
    assert strided.eq(1).all()  # non-overlapping windows: every input reaches exactly one output


def test_firing_rates_and_synaptic_operations_equal_hand_counts():
    snn = tiny_snn()
    with FiringRateMonitor(snn) as monitor, torch.no_grad():
        snn(tiny_input())
    # layer 1 and 2: 3 spikes per step in sample 0, over T*B*18 = 72 slots; layer 3: unit 0 at both steps, /12
    assert monitor.rates() == {"body.1": 6 / 72, "body.3": 6 / 72, "body.6": 2 / 12}
    assert monitor.mean_rate() == pytest.approx(14 / 156)
    # conv2: 2 steps x (corner 8 + centre 18 + corner 8) = 68 ACs; fc: 2 steps x 3 inputs x 3 outputs = 18
    assert monitor.accumulates == {"body.0": 0, "body.2": 68, "body.5": 18}
    # conv1 is analog: dense MACs as executed, T*B*18 outputs x 9 taps
    assert monitor.multiply_accumulates == {"body.0": 648, "body.2": 0, "body.5": 0}
    eff = monitor.efficiency()
    assert eff["efficiency/sops_per_sample"] == 86 / 2
    assert eff["efficiency/macs_per_sample"] == 648 / 2
    assert eff["efficiency/ann_macs_per_sample"] == 18 * 9 + 18 * 18 + 3 * 18  # per step, per sample: 540
    assert eff["efficiency/energy_uj"] == pytest.approx((324 * 4.6 + 43 * 0.9) * 1e-6)
    assert eff["efficiency/ann_energy_uj"] == pytest.approx(540 * 4.6 * 1e-6)
    custom = monitor.efficiency(mac_pj=1.0, ac_pj=2.0)
    assert custom["efficiency/energy_uj"] == pytest.approx((324 + 2 * 43) * 1e-6)


def test_counts_accumulate_over_batches_and_stop_when_the_context_ends():
    snn = tiny_snn()
    with FiringRateMonitor(snn) as monitor, torch.no_grad():
        snn(tiny_input())
        snn(tiny_input())
    assert monitor.samples == 4 and monitor.accumulates["body.2"] == 2 * 68
    assert monitor.efficiency()["efficiency/sops_per_sample"] == 86 / 2
    with torch.no_grad():
        snn(tiny_input())  # hooks are gone
    assert monitor.samples == 4


def test_ann_counts_only_dense_macs():
    ann = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(18, 3)).eval()
    with FiringRateMonitor(ann) as monitor, torch.no_grad():
        ann(tiny_input())
    eff = monitor.efficiency()
    assert monitor.rates() == {} and eff["efficiency/sops_per_sample"] == 0
    assert eff["efficiency/macs_per_sample"] == eff["efficiency/ann_macs_per_sample"] == 18 * 9 + 3 * 18
