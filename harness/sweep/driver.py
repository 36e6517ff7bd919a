"""Running a sweep: its state file, its MLflow parent run, Ray, the Tune experiment, and how its runs end.

A new sweep gets an id (`<name>-<time>`), a parent MLflow run (tags `sweep.id`, `sweep.name`,
`sweep.role: parent`; the sweep file and trial list as artifacts) and a state file
`<storage>/<sweep id>/sweep.json` that holds what each trial's worker gets: its recipe with the sweep's
tags, its run name, its own output folder and `engine.threads` set to the trial's CPUs if unset.
When Tune's scheduler stops a trial early, or the sweep is interrupted, the trial's run ends KILLED (tag
`sweep.stopped`: early / interrupted). The parent run ends FINISHED (every trial finished or was stopped
early), FAILED (a trial still failed after its retries, or the driver failed) or KILLED (interrupted:
trials left to run), with the counts of its runs as tags. `--resume` reopens it and restores the Tune
experiment from the state file, as it was started: unfinished and errored trials continue from their last
checkpoints, finished ones are kept.
Without `--address` Ray starts locally; `--address auto|ray://host:port` joins a running cluster (the
tracking URI must then be reachable from every node: an MLflow server, or sqlite on a shared disk).
Ray and MLflow are imported where they are used, so that expanding a sweep (`--dry-run`) stays light.
"""

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.sweep.plan import Trial, describe, expand
from harness.sweep.spec import SweepError, SweepSpec, load_sweep
from harness.sweep.trial import run_trial

STATE_FILE = "sweep.json"


@dataclass
class Sweep:
    """A sweep as its state file (`<storage>/<sweep id>/sweep.json`) keeps it: enough to resume it without
    the sweep file. `trials` maps a trial name to what its worker gets: variant, source, parent run and the
    resolved recipe (with the sweep's tags, run name, output folder and threads)."""

    sweep_id: str
    parent_run_id: str
    spec: SweepSpec
    trials: dict[str, dict[str, Any]]
    experiment_dir: Path

    @property
    def track(self) -> dict[str, Any]:
        return next(iter(self.trials.values()))["recipe"]["track"]

    def save(self) -> None:
        self.experiment_dir.mkdir(parents=True, exist_ok=True)
        state = {"sweep_id": self.sweep_id, "parent_run_id": self.parent_run_id,
                 "spec": self.spec.model_dump(mode="json"), "trials": self.trials}
        (self.experiment_dir / STATE_FILE).write_text(json.dumps(state, indent=1))

    @classmethod
    def load(cls, experiment_dir: Path) -> "Sweep":
        path = experiment_dir / STATE_FILE
        if not path.is_file():
            raise SweepError(f"--resume: {experiment_dir} holds no {STATE_FILE}: not a sweep folder")
        state = json.loads(path.read_text())
        return cls(state["sweep_id"], state["parent_run_id"], SweepSpec.model_validate(state["spec"]),
                   state["trials"], experiment_dir)


def run_sweep(sweep_file: str | Path, overrides: tuple[str, ...] = (), only: tuple[str, ...] = (),
              address: str | None = None, resume: str | None = None, num_cpus: int | None = None,
              echo=print) -> dict[str, Any]:
    """Run the sweep, or with `resume` ("latest" or a sweep folder) continue it as it was started (its
    state file, not the sweep file, says what runs); return the summary of its runs."""
    sweep_file = Path(sweep_file)
    spec = load_sweep(sweep_file)
    storage = Path(spec.storage).resolve()
    if resume:
        if overrides or only:
            raise SweepError("--resume continues the sweep as it was started: -o and --only do not apply")
        from harness import track

        sweep = Sweep.load(_latest_experiment_dir(storage, spec.name) if resume == "latest" else Path(resume))
        track.reopen_run(sweep.track["tracking_uri"], sweep.parent_run_id)
    else:
        sweep = _start(spec, sweep_file, expand(spec, sweep_file, overrides, only), storage)
    started, ended = False, "FAILED"  # how the parent ends if the driver itself fails
    try:
        started = connect_ray(address, num_cpus)
        if resume:
            from ray import tune

            if not tune.Tuner.can_restore(str(sweep.experiment_dir)):
                raise SweepError(f"--resume: {sweep.experiment_dir} holds no Tune experiment state to restore")
        echo(f"sweep {sweep.sweep_id}: {len(sweep.trials)} trials; MLflow parent run {sweep.parent_run_id}; "
             f"Tune folder {sweep.experiment_dir}")
        _tuner(sweep, restore=bool(resume)).fit()
        ended = None
    except (KeyboardInterrupt, SystemExit):
        ended = "KILLED"
        raise
    finally:
        if started:  # stops trials still running (an interrupt leaves them) before their runs are ended
            import ray

            ray.shutdown()
        summary = _finish(sweep, ended)
    return summary


def connect_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Make sure Ray is up: reuse this process's, join `address`, or start one here. True if started here."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=num_cpus, include_dashboard=False)
    return True


def _start(spec: SweepSpec, sweep_file: Path, trials: list[Trial], storage: Path) -> Sweep:
    """The parent MLflow run, each trial's worker config, and the state file of a new sweep."""
    from harness import track

    sweep_id = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    uri, experiment = trials[0].recipe.track.tracking_uri, trials[0].recipe.track.experiment
    tags = {"sweep.id": sweep_id, "sweep.name": spec.name, "sweep.role": "parent",
            "sweep.trials": str(len(trials)), "sweep.scheduler": spec.scheduler.kind}
    parent_run_id = track.create_run(uri, experiment, sweep_id, tags)
    track.log_text(uri, parent_run_id, sweep_file.read_text(), "sweep.yaml")
    track.log_text(uri, parent_run_id, describe(trials) + "\n", "trials.txt")
    configs = {}
    for trial in trials:
        recipe = trial.recipe
        recipe.track.tags = {**recipe.track.tags, "sweep.id": sweep_id, "sweep.name": spec.name,
                             "sweep.variant": trial.variant, "sweep.trial": trial.name}
        recipe.track.run_name = trial.name
        recipe.track.output_dir = str(Path(recipe.track.output_dir).resolve() / "sweeps" / sweep_id / trial.name)
        if recipe.engine.threads is None:
            recipe.engine.threads = max(1, int(spec.resources.cpu))
        configs[trial.name] = {"variant": trial.variant, "source": str(sweep_file), "parent_run_id": parent_run_id,
                               "recipe": recipe.model_dump(mode="json")}
    sweep = Sweep(sweep_id, parent_run_id, spec, configs, storage / sweep_id)
    sweep.save()
    return sweep


def _tuner(sweep: Sweep, restore: bool):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    spec = sweep.spec
    trainable = tune.with_resources(tune.with_parameters(run_trial, trials=sweep.trials),
                                    {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    if restore:
        return tune.Tuner.restore(str(sweep.experiment_dir), trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)
    sched = spec.scheduler
    if sched.kind == "asha":
        max_t = max(t["recipe"]["optim"]["epochs"] for t in sweep.trials.values())
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=sched.grace_period,
                                  reduction_factor=sched.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(list(sweep.trials))},
        tune_config=tune.TuneConfig(metric=sched.metric, mode=sched.mode, scheduler=scheduler,
                                    max_concurrent_trials=spec.max_concurrent, reuse_actors=True,
                                    trial_name_creator=_tune_trial_name, trial_dirname_creator=_tune_trial_dirname),
        run_config=tune.RunConfig(name=sweep.sweep_id, storage_path=str(sweep.experiment_dir.parent),
                                  failure_config=tune.FailureConfig(max_failures=spec.retries),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1), verbose=1),
    )


def _tune_trial_name(trial) -> str:
    return trial.config["trial"]


def _tune_trial_dirname(trial) -> str:
    return f"{trial.config['trial'][:80]}_{trial.trial_id}"


def _trial_statuses(sweep: Sweep) -> dict[str, str]:
    """Tune's status of every trial as the experiment was last saved (TERMINATED, ERROR, PENDING, ...)."""
    from ray.tune import ExperimentAnalysis

    return {t.config["trial"]: t.status for t in ExperimentAnalysis(str(sweep.experiment_dir)).trials}


def _finish(sweep: Sweep, ended: str | None) -> dict[str, Any]:
    """End the sweep's runs that were stopped rather than failed as KILLED (still RUNNING: stopped early by
    the scheduler or cut off; FAILED without the `sweep.error` a raising trial sets: its worker was shut
    down), then the parent: `ended` if given (the driver failed), else KILLED if trials are left to run
    (interrupted), FAILED if a trial errored after its retries, FINISHED otherwise (early stops included)."""
    from harness import track

    statuses = _trial_statuses(sweep) if ended is None else {}
    left = [name for name, status in statuses.items() if status not in ("TERMINATED", "ERROR")]
    failed = [name for name, status in statuses.items() if status == "ERROR"]
    ended = ended or ("KILLED" if left else "FAILED" if failed else "FINISHED")
    uri, experiment = sweep.track["tracking_uri"], sweep.track["experiment"]
    children = {"mlflow.parentRunId": sweep.parent_run_id}
    for run in track.find_runs(uri, experiment, children):
        stopped = run.status == "FAILED" and "sweep.error" not in run.tags
        if run.status == "RUNNING" or stopped:
            cut_off = ended == "KILLED" and run.tags.get("sweep.trial") in left
            track.set_tags(uri, run.run_id, {"sweep.stopped": "interrupted" if cut_off else "early"})
            track.end_run(uri, run.run_id, "KILLED")
    runs = track.find_runs(uri, experiment, children)
    counts = {status: sum(r.status == status for r in runs) for status in ("FINISHED", "FAILED", "KILLED")}
    track.set_tags(uri, sweep.parent_run_id, {f"sweep.runs_{status.lower()}": str(n) for status, n in counts.items()})
    track.end_run(uri, sweep.parent_run_id, ended)
    return {"status": ended, "runs": counts, "trials": len(sweep.trials), "failed_trials": failed,
            "sweep_id": sweep.sweep_id, "parent_run_id": sweep.parent_run_id, "experiment": experiment,
            "tracking_uri": uri, "experiment_dir": str(sweep.experiment_dir)}


def _latest_experiment_dir(storage: Path, name: str) -> Path:
    found = sorted(storage.glob(f"{name}-*/{STATE_FILE}"))
    if not found:
        raise SweepError(f"--resume: no sweep {name!r} to resume under {storage}/ (no {name}-*/{STATE_FILE})")
    return found[-1].parent
