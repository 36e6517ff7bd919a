"""dsr-harness: train spiking neural networks with DSR and compare them with their baselines.

Subpackages: `snn` (neurons, time coding, spikify), `models` (timm-registered backbones), `data`,
`methods`, `engine`; modules `recipe`, `track`, `cli`. See README.md and ../shared/DESIGN.md.
"""

__version__ = "0.1.0"
