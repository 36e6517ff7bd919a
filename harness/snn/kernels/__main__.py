"""`python -m harness.snn.kernels`: build the CPU fused neuron now (as `make install` does) and say which
kernel each device would use."""

import torch

from harness.snn import kernels

if __name__ == "__main__":
    for device in ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]:
        available, reason = kernels.fused_status(device)
        print(f"{device}: {'fused kernel ready' if available else 'plain loop (' + reason + ')'}")
