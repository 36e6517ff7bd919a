"""`method.name: qcfs`: ANN-to-SNN conversion with the QCFS activation (Bu et al., ICLR 2022).

Training: the backbone as an ANN whose every activation is QCFS(L, lambda_init) (`harness.snn.qcfs`),
max pooling replaced by average pooling before training, and, as in the paper, no activation after the
output layer (its outputs are the logits; in the SNN, their time mean). Evaluation, after the trainer's
ANN evaluation: the ANN converted to IF neurons (`harness.snn.convert.convert_qcfs`) runs once for
max(eval_T) steps; since step t depends only on steps <= t, its outputs averaged over the first T steps
are the SNN's logits at T for every T in `eval_T` at once. Logged: `test/acc1_T{T}` for every T,
`test/acc1_ann` (the source ANN), and the run's headline `test/loss`, `test/acc1` (`test/acc5`) replaced
by the SNN's at `method.T`, so a qcfs run is compared with the other methods at its latency.
"""

import torch
from torch import nn

from harness.methods.base import DataInfo, MethodModel, create_backbone, drop_output_activation
from harness.recipe import QCFSMethod, Recipe
from harness.snn import QCFS, convert_qcfs, replace_activations


def snn_evaluator(ann: nn.Module, method: QCFSMethod):
    """`extra_eval(trainer)`: accuracies of the converted SNN at every T, and of the ANN."""
    steps_list = sorted(set(method.eval_T) | {method.T})

    def extra_eval(trainer) -> dict[str, float]:
        snn = convert_qcfs(ann, max(steps_list)).eval()
        top5 = trainer.num_classes > 5
        # per T: loss sum, top-1, top-5; then the ANN's top-1 and the sample count
        totals = torch.zeros(3 * len(steps_list) + 2, dtype=torch.float64)
        for x, y in trainer.val_loader:
            x, y = x.to(trainer.device, trainer.input_dtype), y.to(trainer.device)
            with trainer.autocast():
                cumulative = snn.forward_steps(x).float().cumsum(dim=0)
                ann_logits = ann(x).float()
            counts = []
            for T in steps_list:
                logits = cumulative[T - 1] / T
                top = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
                counts += [nn.functional.cross_entropy(logits, y, reduction="sum").item(),
                           top[:, 0].sum().item(), top.any(dim=1).sum().item()]
            totals += torch.tensor(counts + [(ann_logits.argmax(dim=1) == y).sum().item(), y.shape[0]],
                                   dtype=torch.float64)
        totals = trainer.reduce(totals)
        n = totals[-1].item()
        per_T = {T: totals[3 * i:3 * i + 3] / n for i, T in enumerate(steps_list)}
        metrics = {f"test/acc1_T{T}": 100.0 * per_T[T][1].item() for T in method.eval_T}
        metrics["test/acc1_ann"] = 100.0 * totals[-2].item() / n
        loss, acc1, acc5 = per_T[method.T].tolist()
        metrics.update({"test/loss": loss, "test/acc1": 100.0 * acc1})
        if top5:
            metrics["test/acc5"] = 100.0 * acc5
        return metrics

    return extra_eval


def build(recipe: Recipe, data: DataInfo) -> MethodModel:
    method: QCFSMethod = recipe.method
    ann = drop_output_activation(create_backbone(recipe, data, act_layer=nn.ReLU), data.input_shape)
    replace_activations(ann, lambda _: QCFS(method.L, method.lambda_init))
    return MethodModel(model=ann, spiking=False, extra_eval=snn_evaluator(ann, method))
