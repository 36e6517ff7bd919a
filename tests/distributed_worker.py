"""Run under torchrun by tests/test_distributed.py: train each recipe given with the real engine components
(process detection, process group, rank-0 run folder, Trainer with DDP) and save this rank's final model
state to `<out>/<recipe name>.rank<r>.pt`, so the test can compare ranks with each other and with one process.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py OUT RECIPE...
"""

import sys
from pathlib import Path

import torch

from harness.engine import distributed
from harness.engine.launch import agree_on_run, process_group
from harness.engine.loop import Trainer
from harness.recipe import load_recipe
from harness.track import Tracker


def main(out: Path, recipe_paths: list[str]) -> None:
    process = distributed.detect_process()
    recipes = [load_recipe(path) for path in recipe_paths]
    with process_group(recipes[0], process):  # one group: torchrun's store serves one
        for recipe in recipes:
            run_dir, state = agree_on_run(recipe, None, process)
            trainer = Trainer(recipe, run_dir, resume=state, process=process)
            trainer.fit(Tracker(recipe, enabled=False))
            torch.save(trainer.final_state(), out / f"{recipe.name}.rank{process.rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
