"""The Tune trainable: one trial is one `launch` of its recipe, in one process, and one MLflow run.

`run_trial` runs in a Tune worker. It reports every epoch's metrics with the epoch's `last.pt` as Tune
checkpoint (the last epoch once the run has ended, so that a scheduler stopping at `max_t` cannot cut it
off). The run is nested under the sweep's parent run and tagged `sweep.id`, `sweep.name`, `sweep.variant`,
`sweep.trial` (set by the driver), `sweep.trial_id` and `sweep.attempt`. A retried or resumed trial
restarts from its last checkpoint, which names its MLflow run, so the run continues; an attempt that failed
before it had a checkpoint leaves its run FAILED with tag `sweep.error` (the error, naming the sweep file
and trial), and the retry starts a new one. A trial is always one process, whatever launcher environment
(`SLURM_PROCID`, torchrun's `RANK`, ...) the Ray worker inherited.
"""

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from harness.errors import in_file
from harness.recipe import Recipe

TAG_LIMIT = 5000  # characters MLflow keeps in one tag value


def run_trial(config: dict[str, Any], trials: dict[str, dict[str, Any]]) -> None:
    """Tune's trainable: one `launch` of the trial's recipe, reporting every epoch with its checkpoint."""
    from ray import tune

    from harness import track
    from harness.engine.distributed import ProcessInfo
    from harness.engine.launch import launch

    trial = trials[config["trial"]]
    recipe = Recipe.model_validate(trial["recipe"])
    uri, experiment = recipe.track.tracking_uri, recipe.track.experiment
    trial_id = tune.get_context().get_trial_id()
    attempt = str(len(track.find_runs(uri, experiment, {"sweep.trial_id": trial_id})))
    recipe.track.tags = {**recipe.track.tags, "sweep.trial_id": trial_id, "sweep.attempt": attempt}
    output_dir = Path(recipe.track.output_dir)
    resume = None
    restored = tune.get_checkpoint()
    if restored is not None:
        resume = restored.to_directory(str(output_dir / recipe.name / f"restored-{time.strftime('%Y%m%d-%H%M%S')}"))

    last_epoch: dict[str, Any] = {}

    def report(epoch: int, metrics: dict[str, float]) -> None:
        if epoch == recipe.optim.epochs:  # reported once the run has ended: a stop at max_t cannot cut it off
            last_epoch.update(metrics, epoch=epoch)
            return
        with tempfile.TemporaryDirectory() as folder:
            shutil.copy2(_newest_checkpoint(output_dir, recipe.name), folder)
            tune.report({**metrics, "epoch": epoch}, checkpoint=tune.Checkpoint.from_directory(folder))

    try:
        with in_file(f"{trial['source']} [trial {config['trial']}]"):
            launch(recipe, resume=resume, process=ProcessInfo(), on_epoch_end=report,
                   parent_run_id=trial["parent_run_id"])
        if last_epoch:
            tune.report(last_epoch)
    except Exception as error:
        message = f"{type(error).__name__}: {error}"[:TAG_LIMIT]
        runs = track.find_runs(uri, experiment, {"sweep.trial_id": trial_id, "sweep.attempt": attempt})
        if runs:
            track.set_tags(uri, runs[0].run_id, {"sweep.error": message})
        else:  # failed before launch opened its run: record the attempt as a FAILED run of its own
            with track.Tracker(recipe, parent_run_id=trial["parent_run_id"]) as tracker:
                tracker.set_tag("sweep.error", message)
                raise
        raise


def _newest_checkpoint(output_dir: Path, name: str) -> Path:
    return max((output_dir / name).glob("*/last.pt"), key=lambda p: p.stat().st_mtime)
