"""`engine.kind: deepspeed`: a DeepSpeed engine around the training module, its config and its checkpoints.

Config (`deepspeed_config`), derived from the recipe so that there is one source of truth:
  train_batch_size               = data.batch_size                               (the global batch)
  gradient_accumulation_steps    = engine.grad_accum
  train_micro_batch_size_per_gpu = data.batch_size / (processes * engine.grad_accum)  (must divide)
  bf16 / fp16                    = engine.precision
  gradient_clipping              = optim.grad_clip (0: none)
  zero_optimization.stage        = engine.deepspeed.stage (0-3), CPU offload of the optimizer (stage >= 1)
                                   and of the parameters (stage 3) on request
`engine.deepspeed.config` names a full JSON file instead: it is read as is and the fields above are filled
in; a field it sets must agree with the recipe (a JSON `bf16.enabled: true` under `engine.precision: fp32`,
or a `gradient_clipping` other than `optim.grad_clip`, is refused naming both), and it may not hold a
`scheduler` (the schedule is `optim.schedule`). The optimizer is the recipe's torch optimizer unless the
JSON has an `optimizer` section, in which case DeepSpeed builds its own and the schedule drives that one;
where the config offloads the optimizer to the CPU, Adam/AdamW become DeepSpeed's CPU Adam (`cpu_adam_for`).

Parameter bounds: after each optimizer step every bounded parameter (a DSR threshold) is clamped in
DeepSpeed's fp32 master copy (`deepspeed.utils.safe_get/set_full_fp32_param`, ZeRO 1-3 and the bf16
optimizer) and in the working copy (under ZeRO-3 this process's partition of it); the next step starts from
the clamped master. fp16 at ZeRO stage 0 keeps its master copy out of reach of that API and is refused for
models with bounded parameters. ZeRO-3 cannot partition 0-dim parameters (DSR thresholds, QCFS clips:
DeepSpeed views each parameter as bytes) and is refused for models that have them.

Checkpoints: every rank writes its part with `save_checkpoint(<run>/deepspeed, tag="epoch<e>[-step<s>]")`
(ZeRO partitions the optimizer state over ranks), then rank 0 writes `last.pt`, which names the tag and
holds the SHA-256 of each of its files, and only then deletes older tags: a crash while saving leaves
`last.pt` naming a complete, older tag. Resuming loads the named tag's module and optimizer states
(DeepSpeed unpickles its own files: `harness launch --resume` has verified their checksums before anything
started); a ZeRO checkpoint resumes with the number of processes that wrote it (DeepSpeed's
`ds_to_universal` converts one for another count), and in the precision that wrote it (refused in one line
otherwise; the local and DDP engines resume across a precision change).
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

from harness.data.pipeline import per_process_batch
from harness.engine.engines.base import Engine, SchedulerFactory, StepOutcome
from harness.recipe import EngineConfig, RecipeError
from harness.snn import parameter_bounds

CHECKPOINT_DIR = "deepspeed"


def _precision_fields(precision: str) -> dict[str, dict[str, bool]]:
    return {"bf16": {"enabled": precision == "bf16"}, "fp16": {"enabled": precision == "fp16"}}


def _check_json_agrees(config: dict, derived: dict, cfg: EngineConfig, grad_clip: float | None, path: Path) -> None:
    """Refuse a JSON field that says otherwise than the recipe (`path` names the JSON file)."""
    for field in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if config.get(field, derived[field]) != derived[field]:
            raise RecipeError(f"{field}: {config[field]} disagrees with the recipe ({derived[field]}: data.batch_size, "
                              "the process count and engine.grad_accum); remove it or make it agree", file=path)
    for field in ("bf16", "fp16"):
        given = config.get(field, {})
        enabled = given.get("enabled", False) if isinstance(given, dict) else given
        if field in config and bool(enabled) != derived[field]["enabled"]:
            raise RecipeError(f"{field}.enabled: {enabled} disagrees with the recipe's engine.precision: "
                              f"{cfg.precision}; remove it (the recipe sets precision) or make them agree", file=path)
    if "gradient_clipping" in config and float(config["gradient_clipping"]) != derived["gradient_clipping"]:
        raise RecipeError(f"gradient_clipping: {config['gradient_clipping']} disagrees with the recipe's "
                          f"optim.grad_clip: {grad_clip}; remove it (the recipe sets clipping) or make them agree",
                          file=path)
    if "scheduler" in config:
        raise RecipeError("scheduler: not allowed; the schedule comes from the recipe's optim section", file=path)


def deepspeed_config(cfg: EngineConfig, batch_size: int, grad_clip: float | None, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict of the recipe's `engine` section run on `world_size` processes."""
    ds = cfg.deepspeed
    derived = {"train_batch_size": batch_size,
               "train_micro_batch_size_per_gpu": per_process_batch(batch_size, world_size, cfg.grad_accum),
               "gradient_accumulation_steps": cfg.grad_accum,
               **_precision_fields(cfg.precision),
               "gradient_clipping": float(grad_clip or 0.0)}
    if ds.config is not None:
        path = Path(ds.config)
        try:
            config = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RecipeError(f"engine.deepspeed.config: cannot read JSON {path} ({e})") from None
        if not isinstance(config, dict):
            raise RecipeError(f"engine.deepspeed.config: {path} must hold a JSON object")
        _check_json_agrees(config, derived, cfg, grad_clip, path)
        return {**config, **derived}
    if ds.offload_param and ds.stage != 3:
        raise RecipeError(f"engine.deepspeed.offload_param: needs stage 3 (got stage {ds.stage})")
    if ds.offload_optimizer and ds.stage == 0:
        raise RecipeError("engine.deepspeed.offload_optimizer: needs stage 1, 2 or 3 (got stage 0)")
    zero: dict[str, Any] = {"stage": ds.stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu"}
    return {
        **derived,
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,  # offload: DeepSpeed's CPU Adam for Adam/AdamW (cpu_adam_for), torch SGD
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


def cpu_adam_for(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Under ZeRO-Offload the optimizer step runs on the CPU, where DeepSpeed's CPU Adam (vectorised C++, built
    once by DeepSpeed's op builder) is several times faster than torch's: it replaces torch's Adam or AdamW with
    the same parameter groups and hyperparameters (AdamW: decoupled weight decay, `adamw_mode`; Adam: L2 added
    to the gradient, as torch). DeepSpeed has no CPU SGD: an SGD optimizer is returned unchanged."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return optimizer
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    group = optimizer.param_groups[0]
    return DeepSpeedCPUAdam(optimizer.param_groups, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                            weight_decay=group["weight_decay"], amsgrad=group.get("amsgrad", False),
                            adamw_mode=isinstance(optimizer, torch.optim.AdamW))


class DeepSpeedEngine(Engine):
    kind = "deepspeed"

    def __init__(self, cfg: EngineConfig, grad_clip: float | None, process, device, batch_size: int,
                 skip_nonfinite: bool = False):
        if skip_nonfinite:
            raise RecipeError("optim.skip_nonfinite: not available with engine.kind deepspeed, which steps inside "
                              "its own engine; use engine.kind ddp, or fp16 (DeepSpeed's loss scaler skips overflows)")
        super().__init__(cfg, grad_clip, process, device)
        self.config = deepspeed_config(cfg, batch_size, grad_clip, process.world_size)
        self.ds = None  # the DeepSpeed engine

    @property
    def fuses_optimizer(self) -> bool:
        """Never: DeepSpeed steps the optimizer over its own (ZeRO) partitions, and under offload replaces Adam by
        its CPU Adam (`cpu_adam_for`); torch's fused kernels are for the single and DDP engines."""
        return False

    def place(self, model: nn.Module) -> nn.Module:
        stage = self.cfg.deepspeed.stage
        if parameter_bounds(model) and self.cfg.precision == "fp16" and stage == 0:
            raise RecipeError("engine.deepspeed.stage: 0 with engine.precision fp16 keeps fp32 master weights the "
                              "threshold bound cannot reach; use stage 1-3 or bf16")
        scalar = next((name for name, p in model.named_parameters() if p.dim() == 0), None)
        if stage == 3 and scalar is not None:
            raise RecipeError(f"engine.deepspeed.stage: 3 partitions every parameter, and DeepSpeed cannot partition "
                              f"0-dim ones such as {scalar} (a threshold or clip); use stage 1 or 2")
        return super().place(model)

    def setup(self, step_module: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
              make_scheduler: SchedulerFactory) -> None:
        import deepspeed

        self.model = model
        self.collect_bounds(model)
        own = "optimizer" in self.config
        offload = (self.config.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none")
        if offload != "none" and not own:  # the recipe's engine.deepspeed.offload_optimizer, or the JSON's
            optimizer = cpu_adam_for(optimizer)
        with _scalars_broadcast_by_torch(step_module):
            self.ds, _, _, _ = deepspeed.initialize(
                model=step_module, optimizer=None if own else optimizer, config=self.config,
                model_parameters=[p for p in step_module.parameters() if p.requires_grad])
        self.optimizer = self.ds.basic_optimizer if own else optimizer
        self.scheduler = make_scheduler(self.optimizer)
        if self.cfg.compile:
            self.ds.compile()

    def train_step(self, x: torch.Tensor, y: torch.Tensor, step: int, stop_requested: bool = False) -> StepOutcome:
        """DeepSpeed steps inside its engine, so a micro-batch's loss is checked (with the stop request) before
        its backward; a gradient that is not finite while the loss is shows up as a non-finite loss at the
        next step (optim.skip_nonfinite is refused for this engine)."""
        losses, outputs = [], []
        stop = False
        for x_part, y_part in self.micro_batches(x, y):  # DeepSpeed divides by its accumulation steps
            loss, logits = self.ds(x_part, y_part)
            _, stop = self.agree(step, [loss.detach().float()], None, stop_requested)
            self.ds.backward(loss)
            self.ds.step()  # steps the optimizer on the last micro-batch only
            losses.append(loss.detach().float())
            outputs.append(logits.detach().float())
        self.scheduler.step()
        self.apply_bounds()
        return StepOutcome(torch.stack(losses).mean(), torch.cat(outputs), stop=stop)

    @torch.no_grad()
    def apply_bounds(self) -> None:
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        for param, bound in self.bounds:
            master = safe_get_full_fp32_param(param)  # a collective under ZeRO: every rank calls it
            if master is not None:
                safe_set_full_fp32_param(param, master.clamp(min=bound))
            working = param.ds_tensor if hasattr(param, "ds_id") else param
            working.clamp_(min=bound)

    def model_state(self) -> dict[str, torch.Tensor]:
        """The full model state dict (a collective under ZeRO-3, whose parameters are partitioned; complete on
        rank 0)."""
        if self.ds.zero_optimization_stage() < 3:
            return self.model.state_dict()
        prefix = "net."  # the plain model's name inside the training module
        full = self.ds._zero3_consolidated_16bit_state_dict()
        return {k.removeprefix(prefix): v for k, v in (full or {}).items() if k.startswith(prefix)}

    def checkpoint_state(self, run_dir: Path, tag: str) -> dict[str, Any]:
        self.ds.save_checkpoint(str(run_dir / CHECKPOINT_DIR), tag=tag, save_latest=False)
        return {"model": self.model_state(), "optimizer": {},
                "deepspeed": {"tag": tag, "world_size": self.process.world_size, "folder": CHECKPOINT_DIR},
                "scheduler": self.scheduler.state_dict(), "scaler": {}}

    def load_checkpoint_state(self, state: dict[str, Any], run_dir: Path) -> None:
        reference = state.get("deepspeed")
        if reference is None:
            raise RecipeError("engine.kind: deepspeed cannot resume a checkpoint written without DeepSpeed (its "
                              "optimizer state is in another format)")
        folder = run_dir / CHECKPOINT_DIR
        saved_precision = state.get("recipe", {}).get("engine", {}).get("precision", self.cfg.precision)
        if saved_precision != self.cfg.precision:
            raise RecipeError(f"engine.precision: the DeepSpeed checkpoint in {folder} was written in "
                              f"{saved_precision} and DeepSpeed resumes only in the precision it saved (its module and "
                              f"loss-scaler states are of that precision); resume with engine.precision "
                              f"{saved_precision}")
        if reference["world_size"] != self.process.world_size and self.ds.zero_optimization_stage() > 0:
            raise RecipeError(f"--resume: the ZeRO checkpoint in {folder} was written by {reference['world_size']} "
                              f"processes; relaunch with as many (this run has {self.process.world_size}), or "
                              "convert it with DeepSpeed's ds_to_universal")
        path, _ = self.ds.load_checkpoint(str(folder), tag=reference["tag"], load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
        if path is None:
            raise RecipeError(f"--resume: DeepSpeed checkpoint {reference['tag']} missing under {folder}")
        self.scheduler.load_state_dict(state["scheduler"])

    def prune(self, run_dir: Path, keep: str) -> None:
        for old in (run_dir / CHECKPOINT_DIR).glob("epoch*"):
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)
