"""Processes of a run: where this one stands, its process group, and DDP applied to a plain model.

`detect_process()` reads the launcher's environment, first match wins:
  torchrun / torch.distributed.run   RANK, WORLD_SIZE, LOCAL_RANK (+ MASTER_ADDR, MASTER_PORT)
  SLURM (`srun harness launch ...`)  SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID
  Open MPI / MPICH, Intel MPI        OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK} / PMI_RANK, PMI_SIZE, MPI_LOCALRANKID
Outside torchrun, MASTER_ADDR and MASTER_PORT must name the rendezvous (rank 0's host): the cluster
templates export them. No variables: one process, rank 0 of 1, and no process group at all.
`ProcessInfo.nodes`, the machines the job spans, is SLURM_STEP_NUM_NODES under srun, else
ceil(world size / processes on this node) from LOCAL_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_SIZE or
MPI_LOCALNRANKS; `launch` refuses a tracking store that is a file of one machine when it is above 1.

`init_process_group(process, engine, device)`: NCCL on CUDA, gloo on the CPU (`engine.backend` overrides),
with `engine.timeout_s` on every collective, so a process that hangs or is lost fails the others after at
most that long (a killed process closes its sockets and fails them at once). `teardown()` destroys it.

DDP (`apply_ddp`) is a transform of the plain training module (torchtitan style): the model code never
knows. DDP averages gradients over the N processes:  g = (1/N) sum_r g_r.

DSR's threshold gradient under DDP (DSR.md section 3): dL/dV = k_V * sum over the batch of G * 1[xbar > V],
a sum over samples, but G carries the 1/B_r of the mean loss of rank r's batch (B_r = B/N samples):
  single process, global batch B:   dL/dV = k_V/B * sum_{b<B} h_b          (h_b: sample b's term)
  rank r of N, batch B/N:           dL/dV_r = k_V*N/B * sum_{b in r} h_b
  DDP average:                      (1/N) sum_r dL/dV_r = k_V/B * sum_{b<B} h_b
So the averaged threshold gradient already equals the single-process gradient at the same global batch,
exactly as for the weights (both are linear in the per-sample losses); scaling it by N would make it N
times too large. The harness therefore applies no correction; `tests/test_distributed.py` checks the
equality, thresholds included. What does differ is batch norm: each rank normalises with the statistics
of its own B/N samples unless `engine.sync_bn` (`sync_bn.GlobalBatchNorm`), and the forward pass, hence
every gradient, then differs from the global-batch one; with sync_bn the N-process step equals the
one-process step up to float rounding.
"""

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from harness.recipe import EngineConfig, RecipeError

_LAUNCHERS = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("slurm", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"),  # set inside `srun` steps only
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
)
# How many machines the job spans: a node count, or the processes on this node (world size / that = nodes).
_NODE_COUNT = {"slurm": "SLURM_STEP_NUM_NODES"}
_PROCESSES_PER_NODE = {"torchrun": "LOCAL_WORLD_SIZE", "openmpi": "OMPI_COMM_WORLD_LOCAL_SIZE",
                       "mpich": "MPI_LOCALNRANKS"}


@dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands in the job (single process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"  # torchrun, slurm, openmpi, mpich or none
    nodes: int = 1  # machines the job spans

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def detect_process(environ: dict[str, str] | None = None) -> ProcessInfo:
    """This process's rank, world size and local rank from the launcher's environment variables."""
    env = os.environ if environ is None else environ
    for launcher, rank_var, size_var, local_var in _LAUNCHERS:
        if rank_var in env and size_var in env:
            try:
                rank, size = int(env[rank_var]), int(env[size_var])
                local = int(env.get(local_var, 0))
            except ValueError:
                raise RecipeError(f"environment: {rank_var}={env[rank_var]!r}, {size_var}={env[size_var]!r}: "
                                  "expected integers") from None
            if not 0 <= rank < size:
                raise RecipeError(f"environment: {rank_var}={rank} is not in 0..{size_var}-1={size - 1}")
            return ProcessInfo(rank, size, local, launcher, _node_count(env, launcher, size))
    return ProcessInfo()


def _node_count(env, launcher: str, size: int) -> int:
    """Machines the job spans, as the launcher tells it (1 where it does not)."""
    try:
        if launcher in _NODE_COUNT and env.get(_NODE_COUNT[launcher]):
            return max(1, int(env[_NODE_COUNT[launcher]]))
        if launcher in _PROCESSES_PER_NODE and env.get(_PROCESSES_PER_NODE[launcher]):
            return max(1, -(-size // int(env[_PROCESSES_PER_NODE[launcher]])))
    except ValueError:
        pass  # an unreadable count: treated as one node (only the tracking-store check reads it)
    return 1


def process_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of rank `rank`'s global RNG in epoch `epoch` (dropout masks): a pure function of the three."""
    return int(np.random.SeedSequence([seed, epoch, rank, 0x5EED]).generate_state(1)[0])


def backend_for(engine: EngineConfig, device: torch.device) -> str:
    if engine.backend != "auto":
        return engine.backend
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_group(process: ProcessInfo, engine: EngineConfig, device: torch.device) -> None:
    """Join the job's process group (env:// rendezvous at MASTER_ADDR:MASTER_PORT; one process: a group of
    its own on a free local port)."""
    if dist.is_initialized():
        return
    init_method = "env://" if process.distributed else f"tcp://127.0.0.1:{free_port()}"
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ and process.distributed]
    if missing:
        raise RecipeError(f"engine.kind: {engine.kind} with {process.world_size} processes "
                          f"({process.launcher}) needs {' and '.join(missing)} set to rank 0's host and a free port")
    backend = backend_for(engine, device)
    if backend == "nccl" and device.type != "cuda":
        raise RecipeError("engine.backend: nccl needs CUDA devices; use gloo or auto on the CPU")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.environ.setdefault("LOCAL_RANK", str(process.local_rank))  # DeepSpeed reads it, as a launcher would set it
    dist.init_process_group(backend, init_method=init_method, rank=process.rank, world_size=process.world_size,
                            timeout=datetime.timedelta(seconds=engine.timeout_s))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the kernel picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj: Any, process: ProcessInfo) -> Any:
    """Rank 0's `obj` on every rank (identity in a single process)."""
    if not process.distributed:
        return obj
    holder = [obj if process.is_main else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier(process: ProcessInfo) -> None:
    if process.distributed:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, process: ProcessInfo) -> torch.Tensor:
    """Sum of `tensor` over all ranks (a new tensor on its device; identity in a single process)."""
    if not process.distributed:
        return tensor
    summed = tensor.clone()
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    return summed


def broadcast_buffers(module: nn.Module, process: ProcessInfo) -> None:
    """Copy rank 0's buffers (BN running statistics) to every rank, as DDP does before each forward."""
    if process.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def apply_ddp(module: nn.Module, device: torch.device) -> DistributedDataParallel:
    """Wrap the plain training module in DDP (rank 0's parameters and buffers are broadcast once, here).

    No buffer broadcast before every forward (DDP's default): the only buffers that change in training are batch
    norm's, identical on every rank under `engine.sync_bn` (`GlobalBatchNorm`) and broadcast from rank 0 after
    each epoch without it (`Engine.end_epoch`), which is all evaluation reads."""
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, forward_sync_buffers=False)
