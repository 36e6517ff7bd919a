"""The Tune trainable: one trial is one `launch` of its recipe, in one process, and one MLflow run.

`run_trial` runs in a Tune worker. It reports every epoch's metrics with the epoch's `last.pt` as Tune
checkpoint (the last epoch once the run has ended, so that a scheduler stopping at `max_t` cannot cut it
off). The run is nested under the sweep's parent run and tagged `sweep.id`, `sweep.name`, `sweep.variant`,
`sweep.trial` (set by the driver), `sweep.trial_id`, `sweep.attempt` (the latest attempt that wrote it), and
`sweep.node_id` and `sweep.host`, the Ray node and machine that attempt ran on.
Each attempt writes `worker.json` to the trial's output folder: the attempt (counted in that folder, from 0),
the host, Ray node id and pid of its worker process, what it resumed from, and `tune_checkpoint_epoch`, the newest epoch
whose checkpoint Tune has taken (a retry resumes there); an operator finds the trial's process by it.
A retried or resumed trial restarts from its last Tune checkpoint, which names its MLflow run, so the run
continues (tag `resumed`); the epochs after that checkpoint are trained again, and an epoch the lost attempt
had finished and logged is then logged twice. A checkpoint that names another trial's run is refused. An
attempt without a checkpoint starts a new run: the run of an earlier attempt whose worker died (still
RUNNING) ends FAILED. A run that failed gets the tag `sweep.error` (the error, naming the sweep file and
trial; an attempt that failed before `launch` opened its run records it as a FAILED run of its own). A
trial that already has a FINISHED run (Tune's saved state had not caught up when the sweep was cut off)
reports that run's metrics again and trains nothing. A trial is always one process, whatever launcher
environment (`SLURM_PROCID`, torchrun's `RANK`, ...) the Ray worker inherited.
"""

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from harness.errors import in_file
from harness.recipe import Recipe
from harness.sweep.spec import SweepError

TAG_LIMIT = 5000  # characters MLflow keeps in one tag value
WORKER_FILE = "worker.json"


def run_trial(config: dict[str, Any], trials: dict[str, dict[str, Any]]) -> None:
    """Tune's trainable: one `launch` of the trial's recipe, reporting every epoch with its checkpoint."""
    import ray
    from ray import tune

    from harness import track
    from harness.engine import checkpoint
    from harness.engine.distributed import ProcessInfo
    from harness.engine.launch import launch

    name, trial = config["trial"], trials[config["trial"]]
    recipe = Recipe.model_validate(trial["recipe"])
    uri, experiment = recipe.track.tracking_uri, recipe.track.experiment
    trial_id = tune.get_context().get_trial_id()
    runs = track.find_runs(uri, experiment, {"sweep.trial_id": trial_id})
    finished = [run for run in runs if run.status == "FINISHED"]
    if finished:
        tune.report({**finished[0].metrics, "epoch": recipe.optim.epochs})
        return
    output_dir = Path(recipe.track.output_dir)
    attempt = _next_attempt(output_dir)
    node_id = ray.get_runtime_context().get_node_id()
    recipe.track.tags = {**recipe.track.tags, "sweep.trial_id": trial_id, "sweep.attempt": str(attempt),
                         "sweep.node_id": node_id, "sweep.host": socket.gethostname()}
    resume, resumed_run_id, last_epoch, worker = None, None, {}, {}

    def report(epoch: int, metrics: dict[str, float]) -> None:
        if epoch == recipe.optim.epochs:  # reported once the run has ended: a stop at max_t cannot cut it off
            last_epoch.update(metrics, epoch=epoch)
            return
        with tempfile.TemporaryDirectory() as folder:
            shutil.copy2(_newest_checkpoint(output_dir, recipe.name), folder)
            tune.report({**metrics, "epoch": epoch}, checkpoint=tune.Checkpoint.from_directory(folder))
        worker["tune_checkpoint_epoch"] = epoch  # Tune has taken it: a retry resumes here
        _write_worker(output_dir, worker)

    try:
        with in_file(f"{trial['source']} [trial {name}]"):
            restored, resumed_epoch = tune.get_checkpoint(), None
            if restored is not None:
                resume = restored.to_directory(str(output_dir / recipe.name /
                                                   f"restored-{time.strftime('%Y%m%d-%H%M%S')}"))
                state = checkpoint.load(Path(resume) / checkpoint.LAST)
                resumed_run_id, resumed_epoch = state.get("mlflow_run_id"), state["epoch"]
                _check_own_run(resumed_run_id, name, trial_id, uri, experiment, trial["parent_run_id"])
            worker.update(trial=name, trial_id=trial_id, attempt=attempt, host=socket.gethostname(), node_id=node_id,
                          pid=os.getpid(), started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), resumed_from=resume,
                          resumed_at_epoch=resumed_epoch, resumed_run_id=resumed_run_id,
                          tune_checkpoint_epoch=resumed_epoch)
            _write_worker(output_dir, worker)
            for run in runs:
                if run.run_id == resumed_run_id:  # continues: what ended its last attempt no longer applies
                    track.set_tags(uri, run.run_id, {"sweep.attempt": str(attempt)})
                    track.delete_tags(uri, run.run_id, ["sweep.stopped", "sweep.error"])
                elif run.status == "RUNNING":  # its worker died before that attempt had a checkpoint
                    track.set_tags(uri, run.run_id, {"sweep.error": f"the worker process of attempt "
                                                     f"{run.tags.get('sweep.attempt')} died; attempt {attempt} "
                                                     "starts anew"})
                    track.end_run(uri, run.run_id, "FAILED")
            launch(recipe, resume=resume, process=ProcessInfo(), on_epoch_end=report,
                   parent_run_id=trial["parent_run_id"])
        if last_epoch:
            tune.report(last_epoch)
    except Exception as error:
        message = f"{type(error).__name__}: {error}"[:TAG_LIMIT]
        known = {run.run_id for run in runs} - {resumed_run_id}
        mine = [run for run in track.find_runs(uri, experiment, {"sweep.trial_id": trial_id})
                if run.run_id not in known]  # the run this attempt resumed or opened, if any
        if mine:
            track.set_tags(uri, mine[0].run_id, {"sweep.error": message})
        else:  # failed before launch opened its run: record the attempt as a FAILED run of its own
            with track.Tracker(recipe, parent_run_id=trial["parent_run_id"]) as tracker:
                tracker.set_tag("sweep.error", message)
                raise
        raise


def _check_own_run(run_id: str | None, name: str, trial_id: str, uri: str, experiment: str,
                   parent_run_id: str) -> None:
    """Refuse a checkpoint that names another trial's MLflow run: two trials never write one run."""
    from harness import track

    for run in track.find_runs(uri, experiment, {"mlflow.parentRunId": parent_run_id}):
        if run.run_id == run_id and run.tags.get("sweep.trial_id") != trial_id:
            raise SweepError(f"trial {name}: its checkpoint names MLflow run {run_id} of trial "
                             f"{run.tags.get('sweep.trial')} ({run.tags.get('sweep.trial_id')}); not resuming it")


def _next_attempt(output_dir: Path) -> int:
    """This attempt's number: one more than the previous attempt's `worker.json` says, else 0."""
    path = output_dir / WORKER_FILE
    return json.loads(path.read_text())["attempt"] + 1 if path.is_file() else 0


def _write_worker(output_dir: Path, worker: dict[str, Any]) -> None:
    """The trial's `worker.json`, written atomically (an operator or a test may be reading it)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / WORKER_FILE
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(worker, indent=1))
    os.replace(temporary, path)


def _newest_checkpoint(output_dir: Path, name: str) -> Path:
    return max((output_dir / name).glob("*/last.pt"), key=lambda p: p.stat().st_mtime)
