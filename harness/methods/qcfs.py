"""`method.name: qcfs`: ANN-to-SNN conversion with the QCFS activation (Bu et al., ICLR 2022).

Training: the backbone as an ANN whose every activation is QCFS(L, lambda_init) (`harness.snn.qcfs`),
max pooling replaced by average pooling before training, and, as in the paper, no activation after the
output layer (its outputs are the logits; in the SNN, their time mean). Evaluation, after the trainer's
ANN evaluation: the ANN converted to IF neurons (`harness.snn.convert.convert_qcfs`) runs once for
max(eval_T) steps; since step t depends only on steps <= t, its outputs averaged over the first T steps
are the SNN's logits at T for every T in `eval_T` at once. Logged: `test/acc1_T{T}` for every T,
`test/acc1_ann` (the source ANN), and the run's headline `test/loss`, `test/acc1` (`test/acc5`) replaced
by the SNN's at `method.T`, so a qcfs run is compared with the other methods at its latency. The SNN at
`method.T` runs once more under the spike counter, so the headline `firing_rate/*` and `efficiency/*`
(synaptic operations, energy) are also the SNN's at that latency; `efficiency/ann_*` stay the ANN's.
"""

import torch
from torch import nn

from harness.engine.context import RunContext
from harness.engine.evaluation import evaluate_outputs
from harness.methods.base import DataInfo, MethodModel, create_backbone, drop_output_activation
from harness.recipe import ModelConfig, QCFSMethod
from harness.snn import QCFS, convert_qcfs, replace_activations
from harness.snn.stats import FiringRateMonitor


def snn_evaluator(ann: nn.Module, method: QCFSMethod):
    """`extra_eval(run)`: accuracies of the converted SNN at every T, and of the ANN (the shared evaluation
    routine, `harness.engine.evaluation.evaluate_outputs`, over one SNN run of max(T) steps)."""
    steps_list = sorted(set(method.eval_T) | {method.T})

    def extra_eval(run: RunContext) -> dict[str, float]:
        snn = convert_qcfs(ann, max(steps_list)).eval()

        def outputs(x: torch.Tensor) -> dict[str, torch.Tensor]:
            cumulative = snn.forward_steps(x).float().cumsum(dim=0)
            return {"ann": ann(x), **{f"T{T}": cumulative[T - 1] / T for T in steps_list}}

        scores = evaluate_outputs(outputs, run)
        metrics = {f"test/acc1_T{T}": scores[f"T{T}"]["acc1"] for T in method.eval_T}
        metrics["test/acc1_ann"] = scores["ann"]["acc1"]
        metrics.update({f"test/{name}": value for name, value in scores[f"T{method.T}"].items()})
        at_T = convert_qcfs(ann, method.T).eval()  # the cost of the headline latency, counted as every SNN's
        with FiringRateMonitor(at_T) as monitor:
            evaluate_outputs(lambda x: {"snn": at_T(x)}, run)
        monitor.reduce(run.reduce_sum)
        metrics["firing_rate/mean"] = monitor.mean_rate()
        metrics.update({f"firing_rate/{name}": r for name, r in monitor.rates().items()})
        metrics.update(monitor.efficiency(run.mac_pj, run.ac_pj))
        return metrics

    return extra_eval


def build(model: ModelConfig, method: QCFSMethod, data: DataInfo) -> MethodModel:
    ann = drop_output_activation(create_backbone(model, data, act_layer=nn.ReLU), data.input_shape)
    replace_activations(ann, lambda _: QCFS(method.L, method.lambda_init))
    return MethodModel(model=ann, spiking=False, extra_eval=snn_evaluator(ann, method))
