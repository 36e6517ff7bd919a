"""`engine.kind: ddp`: DistributedDataParallel over the job's processes (the plain module with one process).

DDP is applied to the plain training module (torchtitan style; the model code never knows) and averages
gradients over the N processes, g = (1/N) sum_r g_r; with each process's loss the mean over its B/N
samples, that is the gradient of the mean loss over the global batch B (why DSR's threshold gradient
needs no rescaling: `harness/engine/distributed.py`). `engine.sync_bn` converts batch norm to global-batch
statistics (`sync_bn.GlobalBatchNorm`) before the model moves to its device; without it every process
normalises with its own statistics, and rank 0's running statistics are broadcast after each epoch, as
DDP's forward does before each step.
"""

from contextlib import nullcontext

from torch import nn

from harness.engine.distributed import apply_ddp, broadcast_buffers
from harness.engine.engines.local import LocalEngine
from harness.engine.sync_bn import convert_to_global_batchnorm


class DDPEngine(LocalEngine):
    kind = "ddp"

    def place(self, model: nn.Module) -> nn.Module:
        if self.cfg.sync_bn and self.process.distributed:
            model = convert_to_global_batchnorm(model)
        return model.to(self.device)

    def wrap(self, step_module: nn.Module) -> nn.Module:
        return apply_ddp(step_module, self.device) if self.process.distributed else step_module

    def keep_gradients_local(self, last_micro_batch: bool):
        if last_micro_batch or not self.process.distributed:
            return nullcontext()
        return self.train_module.no_sync()

    def end_epoch(self) -> None:
        if not self.cfg.sync_bn:
            broadcast_buffers(self.model, self.process)
