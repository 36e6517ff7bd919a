"""A tuned sweep: every method gets the same tuning budget, then its chosen configuration is trained with N seeds.

A sweep file with a `tuning` section (schema in `spec.py`) runs in two stages, each a Tune experiment with its
own state file and MLflow parent run, both tagged with the one sweep id:
  tune   every cell (a variant at one point of its grid, e.g. dsr_if at T=4) gets `tuning.trials`
         configurations drawn from its own search space (`plan.expand_tuning`), trained on the training data
         less a seeded held-out part (`data.holdout`) and evaluated on that part (`val/*` metrics). ASHA stops
         the worse ones at rungs, comparing each trial only with the trials of its own cell (`CellASHA`), so no
         method's budget depends on another's accuracy. Folder `<storage>/<sweep id>/tune`.
  final  each cell's chosen configuration, trained on the whole training data once per seed of `final.seeds`
         and evaluated on the test split (FIFO: every run to the end). Folder `<storage>/<sweep id>/final`.
The choice in a cell (`choose`): among the cell's trials that reached the most epochs (ASHA's survivors; with
a budget that lets one trial run to the end, those that did), the best last value of `tuning.metric`
(`tuning.mode`); ties go to the earlier trial. Final runs carry the tags `sweep.cell`, `tuning.config` (the
chosen values, JSON), `tuning.trial`, `tuning.metric`, `tuning.score`, `tuning.trials` (configurations the cell
tried) and `tuning.epochs` (epochs its trials trained in all); `harness table` prints them beside the table.
The choices are also written to `<storage>/<sweep id>/selection.json` and logged to the final parent run.
`--resume` (the sweep's folder, or alone: the newest of this name) continues the stage that was cut off: an
unfinished tuning stage first, then the final stage (started, or continued where Tune left it).
"""

import copy
import json
from pathlib import Path
from typing import Any

from ray.tune.schedulers import AsyncHyperBandScheduler
from ray.tune.schedulers.async_hyperband import _Bracket

from harness.recipe import Recipe
from harness.sweep.driver import STATE_FILE, Sweep, check_store, new_sweep_id, run_stage, start, trial_statuses
from harness.sweep.plan import Trial, expand_tuning
from harness.sweep.spec import SweepError, SweepSpec, TuningConfig

SELECTION_FILE = "selection.json"


class CellASHA(AsyncHyperBandScheduler):
    """Tune's ASHA with one bracket per cell: a trial's rungs hold only its own cell's trials. `cell_of` maps a
    trial name (`config["trial"]`) to its cell."""

    def __init__(self, cell_of: dict[str, str], max_t: int, grace_period: int, reduction_factor: float):
        super().__init__(time_attr="training_iteration", max_t=max_t, grace_period=grace_period,
                         reduction_factor=reduction_factor)
        self.cell_of, self.cells = cell_of, {}
        self.bracket_args = (grace_period, max_t, reduction_factor)

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)  # checks metric and mode
        cell = self.cell_of[trial.config["trial"]]
        if cell not in self.cells:
            self.cells[cell] = _Bracket(*self.bracket_args, 0, stop_last_trials=True)
        self._trial_info[trial.trial_id] = self.cells[cell]


def cell_asha(sweep: Sweep) -> CellASHA:
    """The tuning stage's scheduler, from the sweep's `tuning` section; `max_t` is the trials' `optim.epochs`."""
    tuning = sweep.spec.tuning
    max_t = max(trial["recipe"]["optim"]["epochs"] for trial in sweep.trials.values())
    return CellASHA({name: trial["cell"] for name, trial in sweep.trials.items()}, max_t,
                    min(tuning.grace_period, max_t), tuning.reduction_factor)


def choose(sweep: Sweep) -> dict[str, dict[str, Any]]:
    """Per cell of the tuning stage `sweep`: the chosen trial and what the cell spent, from the last result Tune
    saved for each trial (`choose_from`)."""
    from ray.tune import ExperimentAnalysis

    results = {t.config["trial"]: t.last_result or {} for t in ExperimentAnalysis(str(sweep.experiment_dir)).trials}
    return choose_from(sweep.trials, results, sweep.spec.tuning)


def choose_from(trials: dict[str, dict[str, Any]], results: dict[str, dict[str, Any]],
                tuning: TuningConfig) -> dict[str, dict[str, Any]]:
    """Per cell (in trial order): among its trials whose last result holds `tuning.metric`, those that reached
    the most epochs, and of them the best by `tuning.mode` (ties: the earlier trial); with what the cell spent
    (configurations, epochs). `trials`: the stage's trial configs (cell, variant, tuned); `results`: trial name
    -> last result (`epoch` and the metric). SweepError if a cell has no trial with a result."""
    chosen: dict[str, dict[str, Any]] = {}
    for cell in dict.fromkeys(trial["cell"] for trial in trials.values()):
        names = [name for name, trial in trials.items() if trial["cell"] == cell]
        scored = [(name, results[name]) for name in names
                  if tuning.metric in results.get(name, {}) and "epoch" in results[name]]
        if not scored:
            raise SweepError(f"cell {cell}: none of its {len(names)} tuning trials reported {tuning.metric}; "
                             f"nothing to choose (see the trials' runs, tag sweep.error)")
        most = max(result["epoch"] for _, result in scored)
        sign = 1.0 if tuning.mode == "max" else -1.0
        best_name, best = max(((n, r) for n, r in scored if r["epoch"] == most),
                              key=lambda item: sign * item[1][tuning.metric])  # max keeps the first of ties
        trial = trials[best_name]
        spent = sum(int(results.get(n, {}).get("epoch", 0)) for n in names)
        chosen[cell] = {"trial": best_name, "variant": trial["variant"], "tuned": trial["tuned"],
                        "metric": tuning.metric, "score": best[tuning.metric], "epochs_reached": most,
                        "trials": len(names), "epochs": spent}
    return chosen


def final_trials(tuning: Sweep, chosen: dict[str, dict[str, Any]]) -> list[Trial]:
    """The final stage: each cell's chosen recipe on the whole training data (`data.holdout` off), once per
    seed, named `<cell>-seed=<s>`, tagged with what the tuning chose and spent."""
    trials = []
    for cell, choice in chosen.items():
        source = tuning.trials[choice["trial"]]
        for seed in tuning.spec.final.seeds:
            raw = copy.deepcopy(source["recipe"])
            raw["seed"] = seed
            raw["data"]["holdout"] = None
            raw["track"]["output_dir"] = source["output_root"]
            raw["track"]["tags"] = {k: v for k, v in raw["track"]["tags"].items() if not k.startswith("sweep.")}
            raw["track"]["tags"].update({
                "tuning.config": json.dumps(choice["tuned"], sort_keys=True), "tuning.trial": choice["trial"],
                "tuning.metric": choice["metric"], "tuning.score": f"{choice['score']:.4f}",
                "tuning.trials": str(choice["trials"]), "tuning.epochs": str(choice["epochs"])})
            trials.append(Trial(f"{cell}-seed={seed}", choice["variant"], {"seed": seed},
                                Recipe.model_validate(raw), cell=cell, tuned=choice["tuned"]))
    return trials


def run_tuned_sweep(spec: SweepSpec, sweep_file: Path, overrides: tuple[str, ...], only: tuple[str, ...],
                    address: str | None, resume: str | None, num_cpus: int | None, echo=print) -> dict[str, Any]:
    """Both stages (or, with `resume`, what is left of them); the final stage's summary, with the tuning
    stage's under `tuning` and the choices under `selection`. If the tuning stage ends interrupted, its summary
    (status KILLED) is returned and the final stage is not started."""
    from ray import tune

    from harness import track

    storage = Path(spec.storage).resolve()
    if resume:
        if overrides or only:
            raise SweepError("--resume continues the sweep as it was started: -o and --only do not apply")
        root = _root(storage, spec.name, resume)
        tuning = Sweep.load(root / "tune")
        check_store(tuning.track["tracking_uri"], address)
    else:
        sweep_id = new_sweep_id(spec)
        root = storage / sweep_id
        tuning = start(spec, sweep_file, expand_tuning(spec, sweep_file, overrides, only), storage, sweep_id,
                       "tune", scheduler="asha per cell", address=address)
    final_dir = root / "final"
    if not (final_dir / STATE_FILE).is_file():
        statuses = trial_statuses(tuning)
        # unfinished: a trial not ended, or not created yet (Tune generates trials as slots free up, so an
        # experiment interrupted early has saved only some of them)
        if set(statuses) != set(tuning.trials) or any(s not in ("TERMINATED", "ERROR") for s in statuses.values()):
            restore = bool(resume) and tune.Tuner.can_restore(str(tuning.experiment_dir))
            if resume:
                track.reopen_run(tuning.track["tracking_uri"], tuning.parent_run_id)
            scheduler = None if restore else cell_asha(tuning)  # a restored experiment keeps its own
            first = run_stage(tuning, restore, address, num_cpus, echo, scheduler)
            if first["status"] == "KILLED":
                return {**first, "experiment_dir": str(root)}
        chosen = choose(tuning)
        (root / SELECTION_FILE).write_text(json.dumps(chosen, indent=1))
        for cell, choice in chosen.items():
            echo(f"chose {choice['trial']} for {cell}: {choice['metric']} {choice['score']:.2f} after "
                 f"{choice['epochs_reached']} epochs ({choice['trials']} configurations, {choice['epochs']} epochs)")
        final = start(tuning.spec, sweep_file, final_trials(tuning, chosen), storage, tuning.sweep_id, "final",
                      address=address)
        track.log_text(final.track["tracking_uri"], final.parent_run_id, json.dumps(chosen, indent=1), SELECTION_FILE)
        restore = False
    else:
        final = Sweep.load(final_dir)
        chosen = json.loads((root / SELECTION_FILE).read_text())
        restore = tune.Tuner.can_restore(str(final.experiment_dir))
        track.reopen_run(final.track["tracking_uri"], final.parent_run_id)
    summary = run_stage(final, restore, address, num_cpus, echo)
    return {**summary, "experiment_dir": str(root), "selection": chosen,
            "tuning": {"trials": len(tuning.trials), "parent_run_id": tuning.parent_run_id}}


def _root(storage: Path, name: str, resume: str) -> Path:
    """The folder of the tuned sweep to resume: the newest `<name>-*` under `storage` ("latest"), or the given
    folder (its `tune` or `final` subfolder is accepted too)."""
    if resume == "latest":
        found = sorted(storage.glob(f"{name}-*/tune/{STATE_FILE}"))
        if not found:
            raise SweepError(f"--resume: no tuned sweep {name!r} to resume under {storage}/ "
                             f"(no {name}-*/tune/{STATE_FILE})")
        return found[-1].parent.parent
    root = Path(resume).resolve()
    if root.name in ("tune", "final") and (root.parent / "tune" / STATE_FILE).is_file():
        root = root.parent
    if not (root / "tune" / STATE_FILE).is_file():
        raise SweepError(f"--resume: {root} holds no tune/{STATE_FILE}: not the folder of a tuned sweep")
    return root
