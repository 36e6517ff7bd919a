"""The same backbone with another library's neurons, for `harness bench step --peer` and `bench neuron --peer`.

`replace_neurons(model)` swaps every DSR or surrogate-gradient neuron of a model built by the harness for a
`SpikingJellyNeuron`: a wrapper around SpikingJelly's node with the same knobs, on the same time-merged,
time-major input `[T*B, ...]` (unfolded to SpikingJelly's `[T, B, ...]`, folded back). Everything else of
the model (layers, weights, loss, decoding) stays ours, so the two differ only in the neuron.
  DSRIF / DSRLIF -> DSRIFNode / DSRLIFNode (T, threshold V, alpha, V's bound, grad scale, tau, dt);
  SGIF / SGLIF   -> IFNode / LIFNode, multi-step (`step_mode='m'`), v_threshold V, hard reset to 0 or soft
                    (v_reset None), detach_reset; leak lambda as tau = 1/(1 - lambda) with decay_input False
                    (u_t = lambda*u_{t-1} + x_t); surrogates rectangular(width) = Rect(1/width),
                    triangle(width) = PiecewiseQuadratic(1/width), arctan(slope) = ATan(slope).
On the same input both give the same spikes. SpikingJelly's nodes keep state between calls (the membrane
potential); the wrapper resets it at every forward, as `spikingjelly.activation_based.functional.reset_net`
would. SpikingJelly is optional (`pip install --no-deps spikingjelly==2.0.0 loguru`, or `make install` with the
`peer` extra); `import_error()` says why it does not import.
"""

from torch import Tensor, nn

from harness.errors import HarnessError
from harness.snn import DSRIF, DSRLIF, SGLIF, SpikingNeuron
from harness.snn.time import fold_time, unfold_time

PEERS = ("spikingjelly",)
INSTALL = "pip install --no-deps -c requirements.lock spikingjelly loguru (or make install, EXTRAS with peer)"


class PeerError(HarnessError):
    """A peer was asked for where it cannot run (not installed, or nothing of ours to compare it with)."""


def require(peer: str) -> None:
    """Raise `PeerError` (one line naming `--peer` and how to install) unless `peer` can run here."""
    if peer not in PEERS:
        raise PeerError(f"--peer: unknown peer {peer!r}; one of {', '.join(PEERS)}")
    reason = import_error()
    if reason:
        raise PeerError(f"--peer: {peer} does not import ({reason}); install it: {INSTALL}")


def import_error() -> str | None:
    """None when SpikingJelly's neurons import, else the reason (one line)."""
    try:
        import spikingjelly.activation_based.neuron  # noqa: F401
    except Exception as e:  # ImportError, or a dependency of its own that fails to load
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


class SpikingJellyNeuron(nn.Module):
    """One SpikingJelly node on `[T*B, ...]`: reset, unfold to `[T, B, ...]`, run multi-step, fold back.

    Args:
        node: a SpikingJelly node in multi-step mode.
        T: time steps merged into the batch.
    """

    def __init__(self, node: nn.Module, T: int):
        super().__init__()
        self.node = node
        self.T = T

    def forward(self, x: Tensor) -> Tensor:
        self.node.reset()
        return fold_time(self.node(unfold_time(x, self.T)))


def _surrogate(neuron: SGLIF):
    from spikingjelly.activation_based import surrogate

    width, slope = neuron.derivative.keywords.get("width"), neuron.derivative.keywords.get("slope")
    return {"rectangular": lambda: surrogate.Rect(alpha=1.0 / width),
            "triangle": lambda: surrogate.PiecewiseQuadratic(alpha=1.0 / width),
            "arctan": lambda: surrogate.ATan(alpha=slope)}[neuron.surrogate]()


def twin(neuron: SpikingNeuron) -> SpikingJellyNeuron:
    """SpikingJelly's counterpart of one of our neurons (module docstring); ValueError for any other kind."""
    from spikingjelly.activation_based import neuron as sj

    if isinstance(neuron, DSRLIF):
        node = sj.DSRLIFNode(neuron.T, v_threshold=float(neuron.vth.item()), tau=float(neuron.tau),
                             delta_t=float(neuron.dt), alpha=float(neuron.alpha),
                             v_threshold_training=neuron.vth.requires_grad,
                             v_threshold_grad_scaling=neuron.vth_grad_scale, v_threshold_lower_bound=neuron.vth_bound)
    elif isinstance(neuron, DSRIF):
        node = sj.DSRIFNode(neuron.T, v_threshold=float(neuron.vth.item()), alpha=float(neuron.alpha),
                            v_threshold_training=neuron.vth.requires_grad,
                            v_threshold_grad_scaling=neuron.vth_grad_scale, v_threshold_lower_bound=neuron.vth_bound)
    elif isinstance(neuron, SGLIF):
        common = dict(v_threshold=float(neuron.vth), v_reset=0.0 if neuron.reset == "hard" else None,
                      surrogate_function=_surrogate(neuron), detach_reset=neuron.detach_reset, step_mode="m")
        node = (sj.IFNode(**common) if neuron.leak == 1.0 else
                sj.LIFNode(tau=1.0 / (1.0 - neuron.leak), decay_input=False, **common))
    else:
        raise ValueError(f"no SpikingJelly counterpart for {type(neuron).__name__} (DSRIF, DSRLIF, SGIF, SGLIF)")
    return SpikingJellyNeuron(node, neuron.T)


def replace_neurons(model: nn.Module) -> int:
    """Replace, in place, every one of our neurons in `model` by its `twin`; return how many."""
    count = 0
    for name, child in list(model.named_children()):
        if isinstance(child, SpikingNeuron):
            setattr(model, name, twin(child))
            count += 1
        else:
            count += replace_neurons(child)
    return count
