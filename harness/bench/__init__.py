"""The benches of `harness bench` (the loader's lives in `harness.data.throughput`):
  - `step.py`: training-step time and memory against T per method on one backbone (`bench step`), each
    configuration's peak memory in a process of its own on the CPU (`worker.py`, `memory.py`);
  - `neuron.py`: one DSR layer's forward and backward, plain loop against fused kernel, against a copy of its
    input (`bench neuron`);
  - `backward.py`: DSR's representation backward against the exact one, per parameter (`bench backward`);
  - `peer.py`: SpikingJelly's neurons in place of ours (`--peer spikingjelly`);
  - `output.py`: the terminal table, CSV, JSON and plot every bench writes.
"""

from harness.bench.backward import compare_gradients, gradient_agreement
from harness.bench.neuron import run_neuron_bench
from harness.bench.step import BENCH_METHODS, add_ratios, build_model, measure, run_step_bench, saved_bytes

__all__ = ["BENCH_METHODS", "add_ratios", "build_model", "compare_gradients", "gradient_agreement", "measure",
           "run_neuron_bench", "run_step_bench", "saved_bytes"]
