"""The one evaluation routine of the harness: classification scores of one or more outputs of a model over
a validation loader, summed over processes. The trainer evaluates its model with it, and QCFS evaluates its
converted SNN at every T (and its ANN) with it.

For each named output (logits `[B, classes]`) and the labels y over all N validation samples:
  loss = (1/N) sum_i CE(logits_i, y_i);   acc1 = 100/N * #{i: y_i is the top-1 class};
  acc5 = 100/N * #{i: y_i among the top-5} (reported when there are more than 5 classes).
Counts accumulate on the device in float64 (exact integers up to 2^53) and are read once, after the
all-reduce: no host synchronisation per batch.
"""

from collections.abc import Callable

import torch
from torch import nn

from harness.engine.context import RunContext

Outputs = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def topk_correct(logits: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """How many rows have their target among the top `k` logits (a 0-dim tensor on the device)."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return (top == target[:, None]).any(dim=1).sum()


def batch_scores(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`[loss sum, top-1 count, top-5 count]` of one batch, float64 on the device."""
    logits = logits.float()
    return torch.stack([nn.functional.cross_entropy(logits, target, reduction="sum"),
                        topk_correct(logits, target, 1), topk_correct(logits, target, 5)]).double()


@torch.no_grad()
def evaluate_outputs(outputs: Outputs, run: RunContext) -> dict[str, dict[str, float]]:
    """`{name: {"loss", "acc1"[, "acc5"]}}` of every output `outputs(x)` names, over `run.val_loader`
    (each process its shard; the counts are summed over processes)."""
    names: list[str] = []
    totals: torch.Tensor | None = None
    samples = torch.zeros((), dtype=torch.float64, device=run.device)
    for x, y in run.val_loader:
        x = x.to(run.device, run.precision.input_dtype, non_blocking=True)
        y = y.to(run.device, non_blocking=True)
        with run.precision.autocast():
            named = outputs(x)
        scores = torch.stack([batch_scores(logits, y) for logits in named.values()])
        if totals is None:
            names, totals = list(named), torch.zeros_like(scores)
        totals += scores
        samples += y.shape[0]
    if totals is None:
        raise ValueError("the validation loader gave no batch")
    summed = run.reduce_sum(torch.cat([totals.flatten(), samples[None]])).cpu()
    n = summed[-1].item()
    per_output = summed[:-1].view(len(names), 3)
    result = {}
    for name, (loss, top1, top5) in zip(names, per_output.tolist(), strict=True):
        result[name] = {"loss": loss / n, "acc1": 100.0 * top1 / n}
        if run.num_classes > 5:
            result[name]["acc5"] = 100.0 * top5 / n
    return result
