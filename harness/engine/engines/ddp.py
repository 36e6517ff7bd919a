"""`engine.kind: ddp`: DistributedDataParallel over the job's processes (the plain module with one process).

DDP is applied to the plain training module (torchtitan style; the model code never knows) and averages
gradients over the N processes, g = (1/N) sum_r g_r; with each process's loss the mean over its B/N
samples, that is the gradient of the mean loss over the global batch B (why DSR's threshold gradient
needs no rescaling: `harness/engine/distributed.py`). Batch norm (`engine.sync_bn`, and rank 0's running
statistics broadcast after each epoch without it) is handled by the base `Engine` for every engine alike.
"""

from contextlib import nullcontext

from torch import nn

from harness.engine.distributed import apply_ddp
from harness.engine.engines.local import LocalEngine


class DDPEngine(LocalEngine):
    kind = "ddp"

    def wrap(self, step_module: nn.Module) -> nn.Module:
        return apply_ddp(step_module, self.device) if self.process.distributed else step_module

    def keep_gradients_local(self, last_micro_batch: bool):
        if last_micro_batch or not self.process.distributed:
            return nullcontext()
        return self.train_module.no_sync()
