"""The spiking core: DSR and surrogate-gradient neurons, QCFS, spike coding and time layout, and ANN -> SNN
conversion (spikify, QCFS -> IF, threshold calibration).

Time is merged into the batch, time-major (`[T*B, ...]`); `time.py` alone reshapes it. DSR.md states
the math each module implements.
"""

from harness.snn.coding import decoding_weights, rate, weighted_rate
from harness.snn.convert import ConversionIF, activation_percentiles, convert_qcfs, set_thresholds
from harness.snn.dsr import DSRIF, DSRLIF
from harness.snn.neuron import SpikingNeuron, parameter_bounds
from harness.snn.qcfs import QCFS
from harness.snn.sg import SGIF, SGLIF
from harness.snn.spikify import SpikingNet, is_activation, register_activation, replace_activations, spikify
from harness.snn.surrogate import SURROGATES, spike, surrogate_derivative
from harness.snn.time import fold_time, repeat_time, sequence_to_time_major, unfold_time

__all__ = [
    "DSRIF", "DSRLIF", "QCFS", "SGIF", "SGLIF", "SURROGATES", "ConversionIF", "SpikingNeuron", "SpikingNet",
    "activation_percentiles", "convert_qcfs", "decoding_weights", "fold_time", "is_activation", "parameter_bounds",
    "rate", "register_activation", "repeat_time", "replace_activations", "sequence_to_time_major", "set_thresholds",
    "spike", "spikify", "surrogate_derivative", "unfold_time", "weighted_rate",
]
