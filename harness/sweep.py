"""`harness sweep`: a search over recipe fields, run as Ray Tune trials; each trial one `launch`, one MLflow run.

A sweep file (YAML, schema `SweepSpec`):
```
name: mnist5k_methods
recipe: ../quickstart.yaml            # the base recipe, relative to the sweep file
set: {optim.epochs: 3}                # dotted overrides for every trial
space:                                # axes shared by every variant
  seed: [0, 1]                        #   a list is a grid axis
  optim.lr: {loguniform: [1.0e-3, 0.1]}   # a distribution is drawn once per trial
variants:                             # named alternatives, each with its own overrides and axes
  ann:    {set: {method: {name: ann}}}
  dsr_if: {set: {method: {name: dsr, neuron: if}}, space: {method.T: [1, 2, 4, 8]}}
num_samples: 1                        # draws per grid point
scheduler: {kind: asha, metric: test/acc1, mode: max, grace_period: 1}
resources: {cpu: 1, gpu: 0}           # per trial
max_concurrent: 2
retries: 1                            # re-runs of a failed trial (Tune's FailureConfig.max_failures)
storage: ray_results                  # Tune's experiment folders (a shared path on a cluster)
```
Methods are a discriminated union in the recipe, so switching `method.name` needs a whole method section:
a dotted key whose value is a mapping replaces that section, which is what variants are for. A variant
without `T` (the ANN) simply has no `method.T` axis: it runs once per seed, not once per T.

Trials = for each variant in file order: the cross product of its axes (its own first, then the shared
ones it does not redefine; the last varies fastest) x `num_samples`, distributions drawn from one generator
seeded with `sample_seed` in trial order (also for variants left out by `--only`), so `--dry-run` lists
exactly what runs. Overrides apply in the order base recipe, `set`, variant `set`, the trial's axis values,
then the command line's `-o`; every trial's recipe is validated before Ray starts. The driver makes the
tracking URI (recipe, else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here), data paths and output folder
absolute, gives each trial its own output folder, and sets `engine.threads` to the trial's CPUs if unset.

Each trial runs `harness.engine.launch.launch` in the Tune worker, reports every epoch's metrics with the
epoch's `last.pt` as Tune checkpoint, and is one MLflow run nested under the sweep's parent run, tagged
`sweep.id`, `sweep.name`, `sweep.variant`, `sweep.trial`, `sweep.trial_id`, `sweep.attempt`. A retried or
resumed trial restarts from its last checkpoint, which names its MLflow run, so the run continues; an
attempt that failed before it had a checkpoint leaves its run FAILED (tag `sweep.error`) and the retry
starts a new one. When Tune's scheduler stops a trial early, or the sweep is interrupted, the trial's run
ends KILLED (tag `sweep.stopped`: early / interrupted). The parent run ends FINISHED (every trial finished
or was stopped early), FAILED (a trial still failed after its retries, or the driver failed) or KILLED
(interrupted: trials left to run), with the counts of its runs as tags. `--resume` reopens it and
restores the Tune experiment from the state file of the sweep folder, as it was started: unfinished and
errored trials continue from their last checkpoints, finished ones are kept.
Without `--address` Ray starts locally; `--address auto|ray://host:port` joins a running cluster (the
tracking URI must then be reachable from every node: an MLflow server, or sqlite on a shared disk).
"""

import itertools
import json
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, model_validator

from harness.errors import HarnessError
from harness.recipe import (
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Recipe,
    RecipeError,
    Section,
    apply_override,
    validate_recipe,
)
from harness.yamlfile import read_yaml

STATE_FILE = "sweep.json"
TAG_LIMIT = 5000  # characters MLflow keeps in one tag value
_NAME_PATTERN = r"^[A-Za-z0-9_.\-]+$"


class SweepError(HarnessError):
    pass


class Distribution(Section):
    """One random axis: exactly one of the keys, drawn independently for each trial."""

    uniform: tuple[float, float] | None = None  # [low, high]
    loguniform: tuple[PositiveFloat, PositiveFloat] | None = None  # [low, high], log-uniform
    randint: tuple[int, int] | None = None  # [low, high): an integer
    choice: Annotated[list[Any], Field(min_length=1)] | None = None  # one of the values

    @model_validator(mode="after")
    def _exactly_one(self) -> "Distribution":
        given = [k for k in type(self).model_fields if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a distribution has exactly one of {', '.join(type(self).model_fields)} "
                             f"(got {', '.join(given) or 'none'})")
        bounds = self.uniform or self.loguniform or self.randint
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError(f"{given[0]}: low < high required (got {list(bounds)})")
        return self

    def draw(self, rng: random.Random) -> Any:
        if self.uniform:
            return rng.uniform(*self.uniform)
        if self.loguniform:
            low, high = self.loguniform
            return float(low * (high / low) ** rng.random())
        if self.randint:
            return rng.randrange(*self.randint)
        return rng.choice(self.choice)


Axis = Annotated[list[Any], Field(min_length=1)] | Distribution


class Variant(Section):
    """A named alternative: dotted overrides and axes of its own (added to, or replacing, the shared ones)."""

    set: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, Axis] = Field(default_factory=dict)


class SchedulerConfig(Section):
    """Tune's trial scheduler: FIFO runs every trial to the end; ASHA stops the worse ones at rungs."""

    kind: Literal["fifo", "asha"] = "fifo"
    metric: str = "test/acc1"  # a metric every epoch reports (also ranks the trials in the summary)
    mode: Literal["max", "min"] = "max"
    grace_period: PositiveInt = 1  # asha: epochs before a trial may be stopped
    reduction_factor: Annotated[float, Field(gt=1)] = 2.0  # asha: keep 1/reduction_factor at each rung


class ResourcesConfig(Section):
    """What one trial holds; also sets a trial's torch CPU threads when its recipe leaves `engine.threads` unset."""

    cpu: PositiveFloat = 1.0
    gpu: Annotated[float, Field(ge=0)] = 0.0


class SweepSpec(Section):
    """A sweep file; see the module docstring."""

    name: Annotated[str, Field(min_length=1, pattern=_NAME_PATTERN)]
    recipe: str
    set: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, Axis] = Field(default_factory=dict)
    variants: dict[Annotated[str, Field(pattern=_NAME_PATTERN)], Variant] = Field(default_factory=dict)
    num_samples: PositiveInt = 1
    sample_seed: NonNegativeInt = 0
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    max_concurrent: PositiveInt | None = None  # default: as many as the resources allow
    retries: NonNegativeInt = 0
    storage: str = "ray_results"


@dataclass
class Trial:
    """One resolved trial: its name, variant, the axis values that made it, and its validated recipe."""

    name: str
    variant: str
    values: dict[str, Any]
    recipe: Recipe


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


# ----------------------------------------------------------------------------------------------- the file
def load_sweep(path: str | Path) -> SweepSpec:
    path = Path(path)
    raw = read_yaml(path, "sweep", SweepError)
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: a sweep is a YAML mapping (name, recipe, space, ...), got {type(raw).__name__}")
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as e:
        error = e.errors()[0]
        where = ".".join(str(p) for p in error["loc"] if not str(p).startswith(("list[", "Distribution")))
        allowed = f"; allowed: {', '.join(SweepSpec.model_fields)}" if error["type"] == "extra_forbidden" and \
            len(error["loc"]) == 1 else ""
        raise SweepError(f"{path}: {where}: {error['msg'].removeprefix('Value error, ')}{allowed}") from None


def _label(value: Any) -> str:
    if isinstance(value, dict):
        return "_".join(str(v) for v in value.values() if not isinstance(v, (dict, list)))
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _trial_name(variant: str, values: dict[str, Any], sample: int, num_samples: int) -> str:
    parts = [variant] if variant else []
    parts += [f"{key.rsplit('.', 1)[-1]}={_label(value)}" for key, value in values.items()]
    if num_samples > 1:
        parts.append(f"sample={sample}")
    return re.sub(r"[^A-Za-z0-9_.=\-]", "_", "-".join(parts) or "trial")


def _set_dotted(raw: dict, key: str, value: Any, where: str) -> None:
    apply_override(raw, f"{key}={json.dumps(value)}", source=where)


def _absolute_paths(raw: dict, cwd: Path) -> None:
    """Make the recipe's local paths absolute (Tune workers run in their trial folders)."""
    track, data = raw.setdefault("track", {}), raw.setdefault("data", {})
    uri = track.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_absolute():
        uri = f"sqlite:///{cwd / uri.removeprefix('sqlite:///')}"
    elif "://" not in uri:
        uri = str(cwd / uri)
    track["tracking_uri"] = uri
    for key in ("root", "train", "val"):
        if data.get(key) and not Path(data[key]).is_absolute():
            data[key] = str(cwd / data[key])


def expand(spec: SweepSpec, source: str | Path, overrides: tuple[str, ...] = (),
           only: tuple[str, ...] = ()) -> list[Trial]:
    """Every trial of the sweep, in order, each recipe validated (RecipeError names the trial and field)."""
    source = Path(source)
    base_path = (source.parent / spec.recipe).resolve()
    if not base_path.is_file():
        raise SweepError(f"{source}: recipe: base recipe {spec.recipe!r} not found (looked at {base_path})")
    base = read_yaml(base_path, "base recipe", RecipeError) or {}
    variants = spec.variants or {"": Variant()}
    unknown = [name for name in only if name not in variants]
    if unknown:
        raise SweepError(f"{source}: --only: unknown variant {unknown[0]!r}; the file has: "
                         f"{', '.join(variants) or '(none)'}")
    override_keys = {o.split("=", 1)[0].strip() for o in overrides}
    rng, trials, cwd = random.Random(spec.sample_seed), [], Path.cwd()
    for variant_name, variant in variants.items():
        space = {**variant.space, **{k: axis for k, axis in spec.space.items() if k not in variant.space}}
        clash = sorted(override_keys & set(space))
        if clash:
            raise SweepError(f"-o {clash[0]}: that key is a sweep axis in {source}; drop it from -o or from space")
        grid_keys = [k for k, axis in space.items() if isinstance(axis, list)]
        for point, sample in itertools.product(itertools.product(*(space[k] for k in grid_keys)),
                                               range(spec.num_samples)):
            grid = dict(zip(grid_keys, point, strict=True))
            values = {k: grid[k] if k in grid else axis.draw(rng) for k, axis in space.items()}
            if only and variant_name not in only:  # drawn all the same, so the others keep their values
                continue
            name = _trial_name(variant_name, values, sample, spec.num_samples)
            where = f"{source} [trial {name}]"
            raw = json.loads(json.dumps(base))
            for key, value in [*spec.set.items(), *variant.set.items(), *values.items()]:
                _set_dotted(raw, key, value, where)
            for override in overrides:
                apply_override(raw, override)
            _absolute_paths(raw, cwd)
            trials.append(Trial(name, variant_name, values, validate_recipe(raw, where)))
    names = [t.name for t in trials]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise SweepError(f"{source}: two trials are both named {duplicate!r}: give them different variants or axes")
    if not trials:
        raise SweepError(f"{source}: the sweep has no trials")
    _check_one_destination(trials, source)
    return trials


def _check_one_destination(trials: list[Trial], source: Path) -> None:
    destinations = {(t.recipe.track.tracking_uri, t.recipe.track.experiment) for t in trials}
    if len(destinations) > 1:
        raise SweepError(f"{source}: track.experiment / track.tracking_uri differ between trials "
                         f"({sorted(destinations)[:2]}); a sweep logs to one experiment")


def describe(trials: list[Trial]) -> str:
    """The trial list `--dry-run` prints: one line per trial with the values of its axes."""
    width = max(len(t.name) for t in trials)
    lines = [f"{len(trials)} trials"]
    for i, t in enumerate(trials):
        values = "  ".join(f"{k}={_label(v)}" for k, v in t.values.items())
        lines.append(f"{i:>4}  {t.name:<{width}}  {values}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- the worker
def _newest_checkpoint(output_dir: Path, name: str) -> Path:
    return max((output_dir / name).glob("*/last.pt"), key=lambda p: p.stat().st_mtime)


def _attempt_runs(client, recipe: Recipe, trial_id: str, attempt: str | None = None) -> list:
    from harness.track import ensure_experiment

    experiment_id = ensure_experiment(client, recipe.track.experiment, recipe.track.tracking_uri)
    query = f"tags.`sweep.trial_id` = '{trial_id}'"
    if attempt is not None:
        query += f" and tags.`sweep.attempt` = '{attempt}'"
    return client.search_runs([experiment_id], filter_string=query)


def run_trial(config: dict[str, Any], trials: dict[str, dict[str, Any]]) -> None:
    """Tune's trainable: one `launch` of the trial's recipe, reporting every epoch with its checkpoint."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    from harness.engine.launch import launch
    from harness.track import Tracker

    trial = trials[config["trial"]]
    recipe = Recipe.model_validate(trial["recipe"])
    trial_id = tune.get_context().get_trial_id()
    client = MlflowClient(recipe.track.tracking_uri)
    attempt = str(len(_attempt_runs(client, recipe, trial_id)))
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
        launch(recipe, trial["source"], resume=resume, on_epoch_end=report, parent_run_id=trial["parent_run_id"])
        if last_epoch:
            tune.report(last_epoch)
    except Exception as error:
        message = f"{type(error).__name__}: {error}"[:TAG_LIMIT]
        runs = _attempt_runs(client, recipe, trial_id, attempt)
        if runs:
            client.set_tag(runs[0].info.run_id, "sweep.error", message)
        else:  # failed before launch opened its run: record the attempt as a FAILED run of its own
            with Tracker(recipe, parent_run_id=trial["parent_run_id"]) as tracker:
                tracker.set_tag("sweep.error", message)
                raise
        raise


def _tune_trial_name(trial) -> str:
    return trial.config["trial"]


def _tune_trial_dirname(trial) -> str:
    return f"{trial.config['trial'][:80]}_{trial.trial_id}"


# ------------------------------------------------------------------------------------------- the driver
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


def _client(sweep: Sweep):
    from mlflow.tracking import MlflowClient

    return MlflowClient(sweep.track["tracking_uri"])


def _log_text(client, run_id: str, text: str, name: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_text(text)
        client.log_artifact(run_id, str(path))


def _start(spec: SweepSpec, sweep_file: Path, trials: list[Trial], storage: Path) -> Sweep:
    """The parent MLflow run, each trial's worker config, and the state file of a new sweep."""
    from mlflow.tracking import MlflowClient

    from harness.track import ensure_experiment

    sweep_id = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    track = trials[0].recipe.track
    client = MlflowClient(track.tracking_uri)
    experiment_id = ensure_experiment(client, track.experiment, track.tracking_uri)
    tags = {"sweep.id": sweep_id, "sweep.name": spec.name, "sweep.role": "parent",
            "sweep.trials": str(len(trials)), "sweep.scheduler": spec.scheduler.kind}
    parent_run_id = client.create_run(experiment_id, run_name=sweep_id, tags=tags).info.run_id
    _log_text(client, parent_run_id, sweep_file.read_text(), "sweep.yaml")
    _log_text(client, parent_run_id, describe(trials) + "\n", "trials.txt")
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


def _trial_statuses(sweep: Sweep) -> dict[str, str]:
    """Tune's status of every trial as the experiment was last saved (TERMINATED, ERROR, PENDING, ...)."""
    from ray.tune import ExperimentAnalysis

    return {t.config["trial"]: t.status for t in ExperimentAnalysis(str(sweep.experiment_dir)).trials}


def _finish(sweep: Sweep, ended: str | None) -> dict[str, Any]:
    """End the sweep's runs that were stopped rather than failed as KILLED (still RUNNING: stopped early by
    the scheduler or cut off; FAILED without the `sweep.error` a raising trial sets: its worker was shut
    down), then the parent: `ended` if given (the driver failed), else KILLED if trials are left to run
    (interrupted), FAILED if a trial errored after its retries, FINISHED otherwise (early stops included)."""
    statuses = _trial_statuses(sweep) if ended is None else {}
    left = [name for name, status in statuses.items() if status not in ("TERMINATED", "ERROR")]
    failed = [name for name, status in statuses.items() if status == "ERROR"]
    ended = ended or ("KILLED" if left else "FAILED" if failed else "FINISHED")
    client = _client(sweep)
    experiment_id = client.get_run(sweep.parent_run_id).info.experiment_id
    query = f"tags.`mlflow.parentRunId` = '{sweep.parent_run_id}'"
    for run in client.search_runs([experiment_id], query, max_results=50000):
        stopped = run.info.status == "FAILED" and "sweep.error" not in run.data.tags
        if run.info.status == "RUNNING" or stopped:
            cut_off = ended == "KILLED" and run.data.tags.get("sweep.trial") in left
            client.set_tag(run.info.run_id, "sweep.stopped", "interrupted" if cut_off else "early")
            client.set_terminated(run.info.run_id, status="KILLED")
    runs = client.search_runs([experiment_id], query, max_results=50000)
    counts = {status: sum(r.info.status == status for r in runs) for status in ("FINISHED", "FAILED", "KILLED")}
    for status, count in counts.items():
        client.set_tag(sweep.parent_run_id, f"sweep.runs_{status.lower()}", str(count))
    client.set_terminated(sweep.parent_run_id, status=ended)
    return {"status": ended, "runs": counts, "trials": len(sweep.trials), "failed_trials": failed,
            "sweep_id": sweep.sweep_id, "parent_run_id": sweep.parent_run_id,
            "experiment": sweep.track["experiment"], "tracking_uri": sweep.track["tracking_uri"],
            "experiment_dir": str(sweep.experiment_dir)}


def _latest_experiment_dir(storage: Path, name: str) -> Path:
    found = sorted(storage.glob(f"{name}-*/{STATE_FILE}"))
    if not found:
        raise SweepError(f"--resume: no sweep {name!r} to resume under {storage}/ (no {name}-*/{STATE_FILE})")
    return found[-1].parent


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
        sweep = Sweep.load(_latest_experiment_dir(storage, spec.name) if resume == "latest" else Path(resume))
        _client(sweep).update_run(sweep.parent_run_id, status="RUNNING")
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
