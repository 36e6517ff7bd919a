"""Running a sweep: its state file, its MLflow parent run, Ray, the Tune experiment, and how its runs end.

A new sweep gets an id (`<name>-<time>`), a parent MLflow run (tags `sweep.id`, `sweep.name`,
`sweep.role: parent`; the sweep file and trial list as artifacts) and a state file
`<storage>/<sweep id>/sweep.json` that holds what each trial's worker gets: its recipe with the sweep's
tags, its run name, its own output folder and `engine.threads` set to the trial's CPUs if unset.
When Tune's scheduler stops a trial early, or the sweep is interrupted, the trial's run ends KILLED (tag
`sweep.stopped`: early / interrupted). The parent run ends FINISHED (every trial finished or was stopped
early), FAILED (a trial still failed after its retries, or the driver failed) or KILLED (interrupted:
trials left to run), with the counts of its runs as tags. Ctrl-C (SIGINT) and SIGTERM both stop the sweep the
way Tune stops on Ctrl-C: it saves the experiment's state one last time, so each trial is kept as it was
(finished, or to continue from its last checkpoint); a second signal stops it at once. A signal that comes
while the runs are being ended waits until they are, so no run is left RUNNING. `--resume` reopens the
parent and restores the Tune experiment from the state file, as it was started: unfinished and errored
trials continue from their last checkpoints (their MLflow runs continue), finished ones are not run again.
A trial whose worker process dies (killed, out of memory, node lost) is retried up to `retries` times, from
its last checkpoint.
Without `--address` Ray starts locally; `--address host:port|auto|ray://host:port` joins a running cluster,
whose every node must reach the tracking URI: a sqlite file (or a local folder) is refused when the cluster
has more than one node, before anything is written (`check_store`); use an MLflow server.
Ray and MLflow are imported where they are used, so that expanding a sweep (`--dry-run`) stays light.
"""

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
    stage: str = ""  # a tuned sweep's "tune" or "final" stage (its own Tune experiment and parent run)

    @property
    def track(self) -> dict[str, Any]:
        return next(iter(self.trials.values()))["recipe"]["track"]

    def save(self) -> None:
        self.experiment_dir.mkdir(parents=True, exist_ok=True)
        state = {"sweep_id": self.sweep_id, "parent_run_id": self.parent_run_id, "stage": self.stage,
                 "spec": self.spec.model_dump(mode="json", exclude_unset=True), "trials": self.trials}  # as written
        (self.experiment_dir / STATE_FILE).write_text(json.dumps(state, indent=1))

    @classmethod
    def load(cls, experiment_dir: Path) -> "Sweep":
        path = experiment_dir / STATE_FILE
        if not path.is_file():
            raise SweepError(f"--resume: {experiment_dir} holds no {STATE_FILE}: not a sweep folder")
        state = json.loads(path.read_text())
        return cls(state["sweep_id"], state["parent_run_id"], SweepSpec.model_validate(state["spec"]),
                   state["trials"], experiment_dir, state.get("stage", ""))


def run_sweep(sweep_file: str | Path, overrides: tuple[str, ...] = (), only: tuple[str, ...] = (),
              address: str | None = None, resume: str | None = None, num_cpus: int | None = None,
              echo=print) -> dict[str, Any]:
    """Run the sweep, or with `resume` ("latest" or a sweep folder) continue it as it was started (its
    state file, not the sweep file, says what runs); return the summary of its runs."""
    sweep_file = Path(sweep_file)
    spec = load_sweep(sweep_file)
    storage = Path(spec.storage).resolve()
    if spec.tuning is not None:
        from harness.sweep.tuned import run_tuned_sweep

        return run_tuned_sweep(spec, sweep_file, overrides, only, address, resume, num_cpus, echo)
    if resume:
        if overrides or only:
            raise SweepError("--resume continues the sweep as it was started: -o and --only do not apply")
        from harness import track

        sweep = Sweep.load(_latest_experiment_dir(storage, spec.name) if resume == "latest" else Path(resume))
        check_store(sweep.track["tracking_uri"], address)  # fails in seconds, before Ray starts
        track.reopen_run(sweep.track["tracking_uri"], sweep.parent_run_id)
    else:
        sweep = start(spec, sweep_file, expand(spec, sweep_file, overrides, only), storage, address=address)
    return run_stage(sweep, bool(resume), address, num_cpus, echo)


def run_stage(sweep: Sweep, restore: bool, address: str | None, num_cpus: int | None, echo=print,
              scheduler=None) -> dict[str, Any]:
    """Run (or with `restore`, continue) the Tune experiment of `sweep`, then end its runs; the summary.
    `scheduler`: Tune's trial scheduler (default: from the sweep file's `scheduler`)."""
    started, ended = False, "FAILED"  # how the parent ends if the driver itself fails
    try:
        started = connect_ray(address, num_cpus)
        if restore:
            from ray import tune

            if not tune.Tuner.can_restore(str(sweep.experiment_dir)):
                raise SweepError(f"--resume: {sweep.experiment_dir} holds no Tune experiment state to restore")
        stage = f" ({sweep.stage} stage)" if sweep.stage else ""
        echo(f"sweep {sweep.sweep_id}{stage}: {len(sweep.trials)} trials; MLflow parent run {sweep.parent_run_id}; "
             f"Tune folder {sweep.experiment_dir}")
        with _sigterm_as_interrupt():
            _tuner(sweep, restore, scheduler).fit()
        ended = None
    except (KeyboardInterrupt, SystemExit):
        ended = "KILLED"
        raise
    finally:
        from harness.track import signals_held

        with signals_held():  # a second Ctrl-C or SIGTERM does not leave runs RUNNING
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


def check_store(uri: str, address: str | None) -> None:
    """Fail in seconds, before a parent run or a trial exists, unless every trial can log to `uri`: it must be
    reachable (`track.check_reachable`) and, on a Ray cluster of several nodes (`address`), not a file of
    this machine (`track.check_shared`)."""
    from harness import track

    track.check_reachable(uri)
    if not address or not track.is_machine_local(uri):
        return
    import ray

    connected = connect_ray(address)
    try:
        nodes = sum(1 for node in ray.nodes() if node["Alive"])
    finally:
        if connected:
            ray.shutdown()  # disconnects this driver; the cluster stays up
    track.check_shared(uri, nodes, f"the Ray cluster at {address}")


def new_sweep_id(spec: SweepSpec) -> str:
    return f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def start(spec: SweepSpec, sweep_file: Path, trials: list[Trial], storage: Path, sweep_id: str | None = None,
          stage: str = "", scheduler: str | None = None, address: str | None = None) -> Sweep:
    """The parent MLflow run, each trial's worker config, and the state file of a new sweep (or of one stage of
    a tuned sweep: its folder `<storage>/<sweep id>/<stage>`, parent run `<sweep id>/<stage>`, tag
    `sweep.stage` on it and its trials, and `sweep.cell` on trials that have one). `address`: the Ray cluster
    the trials will run on (`check_store`)."""
    from harness import track

    sweep_id = sweep_id or new_sweep_id(spec)
    uri, experiment = trials[0].recipe.track.tracking_uri, trials[0].recipe.track.experiment
    check_store(uri, address)  # fails in seconds, before the parent run and Ray start
    staged = {"sweep.stage": stage} if stage else {}
    tags = {"sweep.id": sweep_id, "sweep.name": spec.name, "sweep.role": "parent", **staged,
            "sweep.trials": str(len(trials)), "sweep.scheduler": scheduler or spec.scheduler.kind}
    parent_run_id = track.create_run(uri, experiment, f"{sweep_id}/{stage}" if stage else sweep_id, tags)
    try:
        track.log_text(uri, parent_run_id, sweep_file.read_text(), "sweep.yaml")
        track.log_text(uri, parent_run_id, describe(trials) + "\n", "trials.txt")
        configs = {}
        for trial in trials:
            recipe = trial.recipe
            recipe.track.tags = {**recipe.track.tags, "sweep.id": sweep_id, "sweep.name": spec.name,
                                 "sweep.variant": trial.variant, "sweep.trial": trial.name, **staged,
                                 **({"sweep.cell": trial.cell} if trial.cell else {})}
            recipe.track.run_name = trial.name
            output_root = recipe.track.output_dir
            recipe.track.output_dir = str(Path(recipe.track.output_dir).resolve() / "sweeps" / sweep_id / trial.name)
            if recipe.engine.threads is None:
                recipe.engine.threads = max(1, int(spec.resources.cpu))
            configs[trial.name] = {"variant": trial.variant, "source": str(sweep_file), "parent_run_id": parent_run_id,
                                   "cell": trial.cell, "tuned": trial.tuned, "output_root": output_root,
                                   "recipe": recipe.model_dump(mode="json")}
        folder = storage / sweep_id / stage if stage else storage / sweep_id
        sweep = Sweep(sweep_id, parent_run_id, spec, configs, folder, stage)
        sweep.save()
    except BaseException as error:  # interrupted or failed before the state file names the parent run
        track.end_run(uri, parent_run_id, "KILLED" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "FAILED")
        raise
    return sweep


def _tuner(sweep: Sweep, restore: bool, scheduler=None):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    spec = sweep.spec
    trainable = tune.with_resources(tune.with_parameters(run_trial, trials=sweep.trials),
                                    {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    if restore:
        return tune.Tuner.restore(str(sweep.experiment_dir), trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)
    sched = spec.scheduler
    metric, mode = (spec.tuning.metric, spec.tuning.mode) if sweep.stage == "tune" else (sched.metric, sched.mode)
    if scheduler is None and sched.kind == "asha":
        max_t = max(t["recipe"]["optim"]["epochs"] for t in sweep.trials.values())
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=sched.grace_period,
                                  reduction_factor=sched.reduction_factor)
    elif scheduler is None:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(list(sweep.trials))},
        tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=scheduler,
                                    max_concurrent_trials=spec.max_concurrent, reuse_actors=True,
                                    trial_name_creator=_tune_trial_name, trial_dirname_creator=_tune_trial_dirname),
        run_config=tune.RunConfig(name=sweep.experiment_dir.name, storage_path=str(sweep.experiment_dir.parent),
                                  failure_config=tune.FailureConfig(max_failures=spec.retries),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1), verbose=1),
    )


def _tune_trial_name(trial) -> str:
    return trial.config["trial"]


def _tune_trial_dirname(trial) -> str:
    return f"{trial.config['trial'][:80]}_{trial.trial_id}"


def trial_statuses(sweep: Sweep) -> dict[str, str]:
    """Tune's status of every trial as the experiment was last saved (TERMINATED, ERROR, PENDING, RUNNING, ...);
    none if Tune saved no state (the driver failed before it started)."""
    from ray import tune
    from ray.tune import ExperimentAnalysis

    if not tune.Tuner.can_restore(str(sweep.experiment_dir)):
        return {}
    return {t.config["trial"]: t.status for t in ExperimentAnalysis(str(sweep.experiment_dir)).trials}


def _finish(sweep: Sweep, ended: str | None) -> dict[str, Any]:
    """End the sweep's runs that are left, then the parent; return the summary.

    A run still RUNNING, or FAILED without the `sweep.error` a raising trial sets (its worker was shut down),
    ends KILLED, and gets the tag `sweep.stopped` as does a run its worker ended KILLED when Tune stopped it:
    `early` if Tune ended its trial (the scheduler stopped it), `interrupted` if the trial was left to run. A
    RUNNING run of a trial that errored after its retries (its worker died) ends FAILED with `sweep.error`.
    The parent ends `ended` if given (the driver failed, or was interrupted at once), else KILLED if trials are
    left to run (interrupted), FAILED if a trial errored after its retries, FINISHED otherwise (early stops
    included)."""
    from harness import track

    statuses = trial_statuses(sweep)
    left = [name for name in sweep.trials if statuses.get(name) not in ("TERMINATED", "ERROR")]
    failed = [name for name in sweep.trials if statuses.get(name) == "ERROR"]
    ended = ended or ("KILLED" if left else "FAILED" if failed else "FINISHED")
    uri, experiment = sweep.track["tracking_uri"], sweep.track["experiment"]
    children = {"mlflow.parentRunId": sweep.parent_run_id}
    for run in track.find_runs(uri, experiment, children):
        status = statuses.get(run.tags.get("sweep.trial", ""))
        if run.status == "RUNNING" and status == "ERROR":
            track.set_tags(uri, run.run_id, {"sweep.error": "its worker process died and the trial has no retries "
                                                            "left"})
            track.end_run(uri, run.run_id, "FAILED")
            continue
        cut = run.status == "RUNNING" or (run.status == "FAILED" and "sweep.error" not in run.tags)
        if cut or (run.status == "KILLED" and "sweep.stopped" not in run.tags):  # KILLED: by its stopped worker
            track.set_tags(uri, run.run_id, {"sweep.stopped": "early" if status == "TERMINATED" else "interrupted"})
        if cut:
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


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM (a scheduler, `kill`, Kubernetes) stops the Tune loop as Ctrl-C does: Tune saves
    the experiment's state one last time and returns, so that `--resume` sees each trial as it was. Main
    thread only (elsewhere signals cannot arrive)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum, frame) -> None:
        handler = signal.getsignal(signal.SIGINT)  # Tune's while its loop runs: the first stops it gracefully
        if not callable(handler):
            raise KeyboardInterrupt
        handler(signal.SIGINT, frame)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
