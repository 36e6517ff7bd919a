"""`method.name: dsr`: the backbone spikified with DSR IF or LIF neurons (DSR.md).

Logits are the output layer's spike representation (rate for IF, weighted rate for LIF) with
`readout: spikes` (the paper's network); with `readout: analog` the output layer keeps no neuron and its
output is decoded the same way (the time mean for IF, the weighted mean for LIF), as SG's analog readout.
The loss is cross-entropy on the logits; thresholds are ordinary parameters (same optimizer and weight
decay).

Hybrid start (DSR.md section 4, the ImageNet recipe): `method.init.ann_checkpoint` loads a trained ANN of
the same backbone (a `method: ann` checkpoint, `{"model": state_dict, ...}` or a bare state dict, BN
included) before spikifying, so the SNN holds its weights under `body.`; `method.init.calibrate` then sets,
once before the first epoch of a new run, every threshold to the `percentile` of its ANN activation over
`batches` training batches, times dt for LIF (`harness.snn.convert`). Under a process group each rank
calibrates on its own batches and rank 0's thresholds are broadcast, so all ranks start equal.

`method.backward: representation` (harness/snn/representation.py): each training step runs the spiking
network without a graph, then DSR's backward at batch B on the recorded representations; the loss and the
logits are exact mode's, evaluation is unchanged. Backbones with a layer that does not commute with time
averaging are refused when the method is built (a one-line `RecipeError`), or at the first step.
"""

from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from torch import nn

from harness.engine import checkpoint
from harness.engine.context import RunContext
from harness.methods.base import DataInfo, MethodModel, create_backbone, drop_output_activation
from harness.recipe import DSRMethod, ModelConfig, RecipeError
from harness.snn import DSRIF, DSRLIF, activation_percentiles, set_thresholds, spikify
from harness.snn.representation import NotCommuting, batch_norm_feeders, check_commutes, representation_step

# Placeholder thresholds of neurons whose V comes from calibration (overwritten before the first step).
_CALIBRATED_PLACEHOLDER = {"if": 6.0, "lif": 0.3}


def neuron_factory(method: DSRMethod):
    """A zero-argument builder of fresh neurons with the recipe's knobs."""
    vth = _CALIBRATED_PLACEHOLDER[method.neuron] if method.vth.init == "calibrate" else method.vth.init
    common = dict(vth=vth, alpha=method.alpha, vth_bound=method.vth.bound,
                  vth_grad_scale=method.vth.grad_scale, train_vth=method.vth.train)
    if method.neuron == "lif":
        return lambda: DSRLIF(method.T, tau=method.tau, dt=method.dt, **common)
    return lambda: DSRIF(method.T, **common)


def load_ann_weights(ann: nn.Module, path: str) -> None:
    """Load a `method: ann` checkpoint into `ann`; RecipeError (one line, naming the file) if it does not fit."""
    where = f"method.init.ann_checkpoint: {path}"
    if not Path(path).is_file():
        raise RecipeError(f"{where}: file not found")
    try:  # a harness checkpoint is verified against its checksum; a plain state dict from elsewhere is accepted
        state = checkpoint.load(path, require_checksum=False)
    except checkpoint.CheckpointError as e:
        raise RecipeError(f"{where}: {e.message}") from None
    weights = state.get("model", state) if isinstance(state, dict) else None
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise RecipeError(f"{where}: holds no state dict (expected {{'model': state_dict, ...}} or a state dict)")
    expected = ann.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    reshaped = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if missing or unexpected or reshaped:
        problems = [f"{len(missing)} missing keys (e.g. {missing[0]!r})" if missing else "",
                    f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]!r})" if unexpected else "",
                    f"{reshaped[0]!r} has shape {tuple(weights[reshaped[0]].shape)}, the backbone "
                    f"{tuple(expected[reshaped[0]].shape)}" if reshaped else ""]
        raise RecipeError(f"{where}: not an ANN of this backbone (model.backbone, model.num_classes): "
                          + "; ".join(p for p in problems if p))
    ann.load_state_dict(weights)


def calibrator(ann: nn.Module, snn: nn.Module, method: DSRMethod, frames: bool):
    """`prepare(run)`: thresholds from `ann`'s activations on the run's first training batches."""
    settings = method.init.calibrate
    scale = method.dt if method.neuron == "lif" else 1.0

    def prepare(run: RunContext) -> None:
        ann.to(run.device)
        batches = [x.to(run.device) for x, _ in islice(run.train_loader, settings.batches)]
        if frames:  # [B, T, C, H, W] -> every frame a sample of the ANN
            batches = [x.flatten(0, 1) for x in batches]
        set_thresholds(snn, activation_percentiles(ann, batches, settings.percentile), scale)
        if run.process.distributed:
            for neuron in snn.neurons():
                torch.distributed.broadcast(neuron.vth.data, src=0)
        ann.cpu()

    return prepare


def _not_commuting(e: NotCommuting) -> RecipeError:
    return RecipeError(f"method.backward: representation needs every layer between neurons to commute with time "
                       f"averaging, and {e}: use method.backward: exact")


@dataclass
class RepresentationDSR(MethodModel):
    """DSR with `method.backward: representation`: `forward_loss` runs `representation_step`, whose graph
    is at batch B. The first training step of each process finds the layers feeding each batch norm (with
    `time_covariance`, on one sample) and checks that the backbone's layers commute with time averaging
    (one host read, once)."""

    time_covariance: bool = True
    verified: bool = False
    feeders: dict | None = None

    def forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.time_covariance and self.feeders is None:
            self.feeders = batch_norm_feeders(self.model, x[:1])
        try:
            logits = representation_step(self.model, x, verify=not self.verified, feeders=self.feeders)
        except NotCommuting as e:
            raise _not_commuting(e) from None
        self.verified = True
        return self.loss(logits, y), logits


def build(model: ModelConfig, method: DSRMethod, data: DataInfo) -> MethodModel:
    ann = create_backbone(model, data, act_layer=nn.ReLU)
    if method.init.ann_checkpoint is not None:
        load_ann_weights(ann, method.init.ann_checkpoint)
    if method.readout == "analog":
        drop_output_activation(ann, data.input_shape)
    snn = spikify(ann, neuron_factory(method), method.T, encoding=data.encoding)
    prepare = calibrator(ann, snn, method, data.is_sequence) if method.init.calibrate is not None else None
    if method.backward == "exact":
        return MethodModel(model=snn, spiking=True, prepare=prepare)
    try:
        check_commutes(snn)
    except NotCommuting as e:
        raise _not_commuting(e) from None
    return RepresentationDSR(model=snn, spiking=True, prepare=prepare, time_covariance=method.time_covariance)
