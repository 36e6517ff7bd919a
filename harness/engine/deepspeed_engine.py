"""DeepSpeed as the engine of a run (`engine.kind: deepspeed`): its config, initialisation and checkpoints.

Config (`deepspeed_config`), derived from the recipe so that DeepSpeed's three batch numbers always agree:
  train_batch_size               = data.batch_size                               (the global batch)
  gradient_accumulation_steps    = engine.grad_accum
  train_micro_batch_size_per_gpu = data.batch_size / (processes * engine.grad_accum)  (must divide)
  zero_optimization.stage        = engine.deepspeed.stage (0-3), CPU offload of the optimizer (stage >= 1)
                                   and of the parameters (stage 3) on request
  bf16 / fp16                    = engine.precision;  gradient_clipping = deepspeed.gradient_clipping,
                                   else optim.grad_clip
`engine.deepspeed.config` names a full JSON file instead: it is read as is, its batch fields must agree
with the numbers above (missing ones are filled in), and it may not hold a `scheduler` (the schedule is
`optim.schedule`). The optimizer is the recipe's torch optimizer unless the JSON has an `optimizer`
section, in which case DeepSpeed builds its own.

Checkpoints: every rank writes its part with `save_checkpoint(<run>/deepspeed, tag="epoch<e>")` (ZeRO
partitions the optimizer state over ranks), then rank 0 writes `last.pt`, which names the tag, and only
then deletes older tags: a crash while saving leaves `last.pt` naming a complete, older tag. Resuming
loads `last.pt` (epoch, schedule, RNG, MLflow run) and the named tag's module and optimizer states; a
ZeRO checkpoint resumes with the number of processes that wrote it (DeepSpeed's `ds_to_universal`
converts one for another count).
"""

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from harness.engine.distributed import micro_batch_size
from harness.recipe import Recipe, RecipeError

CHECKPOINT_DIR = "deepspeed"
_BATCH_FIELDS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def deepspeed_config(recipe: Recipe, world_size: int, source: str) -> dict[str, Any]:
    """The DeepSpeed config dict of `recipe` run on `world_size` processes."""
    engine, ds = recipe.engine, recipe.engine.deepspeed
    batch = {"train_batch_size": recipe.data.batch_size,
             "train_micro_batch_size_per_gpu": micro_batch_size(recipe.data.batch_size, world_size, engine.grad_accum,
                                                                source),
             "gradient_accumulation_steps": engine.grad_accum}
    if ds.config is not None:
        path = Path(ds.config)
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RecipeError(f"{source}: engine.deepspeed.config: cannot read JSON {path} ({e})") from None
        if not isinstance(config, dict):
            raise RecipeError(f"{source}: engine.deepspeed.config: {path} must hold a JSON object")
        if "scheduler" in config:
            raise RecipeError(f"{path}: scheduler: not allowed; the schedule comes from the recipe's optim section")
        for field, value in batch.items():
            if config.get(field, value) != value:
                raise RecipeError(f"{path}: {field}: {config[field]} disagrees with the recipe ({value}: "
                                  f"data.batch_size {recipe.data.batch_size}, {world_size} processes, "
                                  f"engine.grad_accum {engine.grad_accum}); remove it or make it agree")
        return {**config, **batch}
    if ds.offload_param and ds.stage != 3:
        raise RecipeError(f"{source}: engine.deepspeed.offload_param: needs stage 3 (got stage {ds.stage})")
    if ds.offload_optimizer and ds.stage == 0:
        raise RecipeError(f"{source}: engine.deepspeed.offload_optimizer: needs stage 1, 2 or 3 (got stage 0)")
    zero: dict[str, Any] = {"stage": ds.stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu"}
    clip = ds.gradient_clipping or recipe.optim.grad_clip
    return {
        **batch,
        "zero_optimization": zero,
        "bf16": {"enabled": engine.precision == "bf16"},
        "fp16": {"enabled": engine.precision == "fp16"},
        "gradient_clipping": clip or 0.0,
        "zero_force_ds_cpu_optimizer": False,  # offload with the recipe's torch optimizer
        "zero_allow_untested_optimizer": True,  # ZeRO with torch SGD/Adam/AdamW
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


@contextmanager
def _scalars_broadcast_by_torch(module: nn.Module) -> Iterator[None]:
    """Broadcast every 0-dim parameter (a DSR threshold V) from rank 0 with torch, and hide it from
    DeepSpeed's initial broadcast while inside: that one views each parameter as bytes, which torch refuses
    for 0-dim tensors. DeepSpeed skips parameters marked `ds_optim_param` there (and, without LoRA
    offload, nowhere else); the mark is removed on the way out."""
    scalars = [p for p in module.parameters() if p.dim() == 0]
    for p in scalars:
        dist.broadcast(p.data, src=0)
        p.ds_optim_param = True
    try:
        yield
    finally:
        for p in scalars:
            del p.ds_optim_param


def initialize(module: nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any]):
    """`(engine, optimizer)`: DeepSpeed around the training module; `optimizer` is the torch optimizer the
    schedule drives (the recipe's, or DeepSpeed's own when the config has an `optimizer` section)."""
    import deepspeed

    own = "optimizer" in config
    with _scalars_broadcast_by_torch(module):
        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=None if own else optimizer,
                                               model_parameters=[p for p in module.parameters() if p.requires_grad],
                                               config=config)
    return engine, engine.basic_optimizer if own else optimizer


def tag_for(epoch: int) -> str:
    return f"epoch{epoch}"


def save(engine, run_dir: Path, epoch: int) -> str:
    """Write this rank's part of the checkpoint after `epoch` (a collective: every rank calls it)."""
    tag = tag_for(epoch)
    engine.save_checkpoint(str(run_dir / CHECKPOINT_DIR), tag=tag, save_latest=False)
    return tag


def prune(run_dir: Path, keep: str) -> None:
    """Delete every tag but `keep` (rank 0, after `last.pt` names `keep`)."""
    for old in (run_dir / CHECKPOINT_DIR).glob("epoch*"):
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def load(engine, run_dir: Path, reference: dict[str, Any], world_size: int, source: str) -> None:
    """Load the module and optimizer states of the tag that `last.pt`'s `reference` names."""
    if reference["world_size"] != world_size and engine.zero_optimization_stage() > 0:
        raise RecipeError(f"{source}: --resume: the ZeRO checkpoint in {run_dir / CHECKPOINT_DIR} was written by "
                          f"{reference['world_size']} processes; relaunch with as many (this run has {world_size}), "
                          "or convert it with DeepSpeed's ds_to_universal")
    path, _ = engine.load_checkpoint(str(run_dir / CHECKPOINT_DIR), tag=reference["tag"],
                                     load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise RecipeError(f"{source}: --resume: DeepSpeed checkpoint {reference['tag']} missing under "
                          f"{run_dir / CHECKPOINT_DIR}")


def model_state(engine, plain: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The full model state dict (a collective under ZeRO-3, whose parameters are partitioned; complete on
    rank 0). `prefix` is the plain model's name inside the module DeepSpeed wraps."""
    if engine.zero_optimization_stage() < 3:
        return plain.state_dict()
    full = engine._zero3_consolidated_16bit_state_dict()
    return {k.removeprefix(prefix): v for k, v in (full or {}).items() if k.startswith(prefix)}
