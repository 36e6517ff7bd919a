"""The spiking core: DSR neurons, spike coding and time layout, and ANN -> SNN conversion.

Time is merged into the batch, time-major (`[T*B, ...]`); `time.py` alone reshapes it. DSR.md states
the math each module implements.
"""

from harness.snn.coding import decoding_weights, rate, weighted_rate
from harness.snn.dsr import DSRIF, DSRLIF
from harness.snn.neuron import SpikingNeuron
from harness.snn.spikify import SpikingNet, is_activation, register_activation, replace_activations, spikify
from harness.snn.time import fold_time, repeat_time, sequence_to_time_major, unfold_time

__all__ = [
    "DSRIF", "DSRLIF", "SpikingNeuron", "SpikingNet", "decoding_weights", "fold_time", "is_activation",
    "rate", "register_activation", "repeat_time", "replace_activations", "sequence_to_time_major",
    "spikify", "unfold_time", "weighted_rate",
]
