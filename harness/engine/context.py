"""What a method's hooks may use of a run (`MethodModel.prepare`, `MethodModel.extra_eval`): a small typed
view, not the trainer. Sums over processes go through `reduce_sum`, so a hook's counts are those of the
whole job whatever the number of processes."""

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from harness.engine.distributed import ProcessInfo, all_reduce_sum
from harness.engine.precision import Precision
from harness.snn.stats import AC_PJ, MAC_PJ


@dataclass(frozen=True)
class RunContext:
    """Args:
        device: where the model and batches live.
        process: this process's rank and the world size.
        precision: autocast and input dtype of the run.
        train_loader: this process's training batches `(x, y)`.
        val_loader: this process's shard of the validation set.
        num_classes: classes of the task.
        mac_pj, ac_pj: energy per multiply-accumulate and per accumulate (the recipe's `efficiency`).
    """

    device: torch.device
    process: ProcessInfo
    precision: Precision
    train_loader: Iterable
    val_loader: Iterable
    num_classes: int
    mac_pj: float = MAC_PJ
    ac_pj: float = AC_PJ

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over every process of the job (on this run's device)."""
        return all_reduce_sum(tensor.to(self.device), self.process)
