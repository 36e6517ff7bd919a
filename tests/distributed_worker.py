"""Run under torchrun by the distributed tests: the real engine components (process detection, process group,
rank-0 run folder, Trainer with its engine) in one of four modes, each writing what the test compares.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py MODE OUT RECIPE...

  train     train each recipe; save this rank's final model state to `<out>/<name>.rank<r>.pt`
  evaluate  evaluate each recipe's freshly built model once; save the metrics to `<out>/<name>.rank<r>.json`
  bounds    train each recipe; save every threshold's DeepSpeed fp32 master value and bound (rank 0) to
            `<out>/<name>.bounds.json`
  nonfinite train the first recipe, rank 1's loss made NaN at step 3; write what each rank raised to
            `<out>/nonfinite.rank<r>.txt` with the seconds from the NaN to the raise, then exit 1
"""

import json
import sys
import time
from pathlib import Path

import torch

from harness.engine import distributed
from harness.engine.engines import NonFiniteError
from harness.engine.launch import agree_on_run, process_group
from harness.engine.loop import Trainer
from harness.recipe import load_recipe
from harness.snn import parameter_bounds
from harness.track import Tracker

NAN_STEP = 3


def master_bounds(trainer: Trainer) -> list[dict]:
    from deepspeed.utils import safe_get_full_fp32_param

    return [{"master": safe_get_full_fp32_param(param).item(), "bound": bound}
            for param, bound in parameter_bounds(trainer.model)]


def poison_rank_1(trainer: Trainer, process: distributed.ProcessInfo, out: Path) -> None:
    """Make rank 1's loss NaN from step NAN_STEP on; note when it first happens."""
    forward_loss = trainer.method.forward_loss

    def nan_loss(x, y):
        loss, logits = forward_loss(x, y)
        if process.rank == 1 and trainer.step >= NAN_STEP:
            (out / "nan_at").write_text(str(time.time()))
            loss = loss * float("nan")
        return loss, logits

    trainer.method.forward_loss = nan_loss


def main(mode: str, out: Path, recipe_paths: list[str]) -> None:
    process = distributed.detect_process()
    recipes = [load_recipe(path) for path in recipe_paths]
    with process_group(recipes[0], process):  # one group: torchrun's store serves one
        for recipe in recipes:
            run_dir, state = agree_on_run(recipe, None, process)
            trainer = Trainer(recipe, run_dir, resume=state, process=process)
            tag = f"{recipe.name}.rank{process.rank}"
            if mode == "evaluate":
                (out / f"{tag}.json").write_text(json.dumps(trainer.evaluate()))
                continue
            if mode == "nonfinite":
                poison_rank_1(trainer, process, out)
                try:
                    trainer.fit(Tracker(recipe, enabled=False))
                except NonFiniteError as error:
                    nan_at = float((out / "nan_at").read_text())
                    (out / f"nonfinite.rank{process.rank}.txt").write_text(f"{time.time() - nan_at}\n{error}")
                    raise
                return
            trainer.fit(Tracker(recipe, enabled=False))
            if mode == "bounds":
                bounds = master_bounds(trainer)
                if process.is_main:
                    (out / f"{recipe.name}.bounds.json").write_text(json.dumps(bounds))
            else:
                torch.save(trainer.final_state(), out / f"{tag}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3:])
