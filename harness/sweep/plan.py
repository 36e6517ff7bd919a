"""A sweep's trials, expanded from its file: pure (no Ray, no MLflow, nothing written), so that `--dry-run`
lists exactly what runs.

Trials = for each variant in file order: the cross product of its axes (its own first, then the shared
ones it does not redefine; the last varies fastest) x `num_samples`, distributions drawn from one generator
seeded with `sample_seed` in trial order (also for variants left out by `--only`, so the others keep their
values). Overrides apply in the order base recipe, `set`, variant `set`, the trial's axis values, then the
command line's `-o`; every trial's recipe is validated here, before Ray starts (at most `MAX_TRIALS`, counted
before any is built). The tracking URI (recipe,
else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here) and data paths are made absolute, since Tune
workers run in their trial folders. A trial is named after its variant and axis values (`dsr_if-T=4-seed=0`).
"""

import copy
import itertools
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.recipe import Recipe, RecipeError, apply_override, set_field, validate_recipe
from harness.sweep.spec import MAX_TRIALS, Axis, Distribution, SweepError, SweepSpec, Variant
from harness.yamlfile import read_yaml


@dataclass
class Trial:
    """One resolved trial: its name, variant, the axis values that made it, and its validated recipe. In a
    tuned sweep's tuning stage also its cell (variant and grid point, `dsr_if-T=4`) and the values drawn from
    the tune space (`tuned`)."""

    name: str
    variant: str
    values: dict[str, Any]
    recipe: Recipe
    cell: str = ""
    tuned: dict[str, Any] = field(default_factory=dict)


def _base_recipe(spec: SweepSpec, source: Path) -> dict:
    base_path = (source.parent / spec.recipe).resolve()
    if not base_path.is_file():
        raise SweepError(f"recipe: base recipe {spec.recipe!r} not found (looked at {base_path})", file=source)
    base = read_yaml(base_path, "base recipe", RecipeError) or {}
    if not isinstance(base, dict):
        raise RecipeError(f"a recipe is a YAML mapping of sections, got {type(base).__name__}", file=base_path)
    return base


def _variants(spec: SweepSpec, source: Path, only: tuple[str, ...]) -> dict[str, Variant]:
    variants = spec.variants or {"": Variant()}
    unknown = [name for name in only if name not in variants]
    if unknown:
        raise SweepError(f"--only: unknown variant {unknown[0]!r}; the file has: {', '.join(variants) or '(none)'}",
                         file=source)
    return variants


def _resolve(base: dict, settings: list[tuple[str, Any]], overrides: tuple[str, ...], where: str) -> Recipe:
    """The validated recipe: `base` with the dotted `settings` in order, then the command line's overrides."""
    raw = copy.deepcopy(base)
    for key, value in settings:
        set_field(raw, key, copy.deepcopy(value), f"{where} {key!r}")
    for override in overrides:
        apply_override(raw, override)
    _absolute_paths(raw, Path.cwd())
    return validate_recipe(raw, where)


def _check_overrides(overrides: tuple[str, ...], keys: set[str], source: Path) -> None:
    clash = sorted({o.split("=", 1)[0].strip() for o in overrides} & keys)
    if clash:
        raise SweepError(f"-o {clash[0]}: that key is a sweep axis in {source}; drop it from -o or from the sweep file")


def expand_tuning(spec: SweepSpec, source: str | Path, overrides: tuple[str, ...] = (),
                  only: tuple[str, ...] = ()) -> list[Trial]:
    """The tuning stage of a tuned sweep (`spec.tuning` set): for every cell (variant x grid point of its
    `space`, in file order), `tuning.trials` configurations, each value of the variant's tune space (its own,
    then the shared `tune` it does not redefine) drawn from a generator seeded by `sample_seed` and the cell's
    name (so a cell's draws do not depend on the other cells or on `--only`); a list is a uniform choice.
    Every trial trains with `seed: tuning.seed` on the training data less the held-out part
    (`data.holdout`, `data.holdout_seed`). Trials are named `<cell>-c<i>`."""
    source, tuning = Path(source), spec.tuning
    if tuning is None:
        raise SweepError("expand_tuning needs a tuned sweep (a tuning section)", file=source)
    base, variants = _base_recipe(spec, source), _variants(spec, source, only)
    cells = []
    for variant_name, variant in variants.items():
        if only and variant_name not in only:
            continue
        space = _space(spec, variant)
        drawn = [k for k, axis in space.items() if not isinstance(axis, list)]
        if drawn:
            raise SweepError(f"space.{drawn[0]}: a tuned sweep's space is the grid of its cells (lists); put "
                             f"distributions under tune", file=source)
        tune = {**variant.tune, **{k: axis for k, axis in spec.tune.items() if k not in variant.tune}}
        for point in itertools.product(*space.values()):
            cells.append((variant_name, variant, dict(zip(space, point, strict=True)), tune))
    if len(cells) * tuning.trials > MAX_TRIALS:
        raise SweepError(f"tuning.trials: {len(cells)} cells x {tuning.trials} make {len(cells) * tuning.trials:,} "
                         f"trials; at most {MAX_TRIALS:,}", file=source)
    trials, width = [], len(str(tuning.trials - 1))
    fixed = [("seed", tuning.seed), ("data.holdout", tuning.holdout), ("data.holdout_seed", tuning.holdout_seed)]
    for variant_name, variant, grid, tune in cells:
        _check_overrides(overrides, {*grid, *tune}, source)
        cell = _trial_name(variant_name, grid, 0, 1)
        rng = random.Random(f"{spec.sample_seed}:{cell}")
        for i in range(tuning.trials):
            tuned = {k: axis.draw(rng) if isinstance(axis, Distribution) else rng.choice(axis)
                     for k, axis in tune.items()}
            name = f"{cell}-c{i:0{width}d}"
            recipe = _resolve(base, [*spec.set.items(), *variant.set.items(), *grid.items(), *tuned.items(), *fixed],
                              overrides, f"{source} [trial {name}]")
            trials.append(Trial(name, variant_name, {**grid, **tuned}, recipe, cell=cell, tuned=tuned))
    _check_trials(trials, source, spec)
    return trials


def expand(spec: SweepSpec, source: str | Path, overrides: tuple[str, ...] = (),
           only: tuple[str, ...] = ()) -> list[Trial]:
    """Every trial of the sweep, in order, each recipe validated (RecipeError names the trial and field). A tuned
    sweep expands to its tuning stage (`expand_tuning`); its final stage follows from the tuning results."""
    if spec.tuning is not None:
        return expand_tuning(spec, source, overrides, only)
    source = Path(source)
    base, variants = _base_recipe(spec, source), _variants(spec, source, only)
    spaces = {name: _space(spec, variant) for name, variant in variants.items()}
    count = spec.num_samples * sum(math.prod(len(axis) for axis in space.values() if isinstance(axis, list))
                                   for space in spaces.values())
    if count > MAX_TRIALS:
        raise SweepError(f"space: the grids x num_samples make {count:,} trials; at most {MAX_TRIALS:,}", file=source)
    rng, trials = random.Random(spec.sample_seed), []
    for variant_name, variant in variants.items():
        space = spaces[variant_name]
        _check_overrides(overrides, set(space), source)
        grid_keys = [k for k, axis in space.items() if isinstance(axis, list)]
        for point, sample in itertools.product(itertools.product(*(space[k] for k in grid_keys)),
                                               range(spec.num_samples)):
            grid = dict(zip(grid_keys, point, strict=True))
            values = {k: grid[k] if k in grid else axis.draw(rng) for k, axis in space.items()}
            if only and variant_name not in only:  # drawn all the same, so the others keep their values
                continue
            name = _trial_name(variant_name, values, sample, spec.num_samples)
            recipe = _resolve(base, [*spec.set.items(), *variant.set.items(), *values.items()], overrides,
                              f"{source} [trial {name}]")
            trials.append(Trial(name, variant_name, values, recipe))
    _check_trials(trials, source, spec)
    return trials


def _space(spec: SweepSpec, variant: Variant) -> dict[str, Axis]:
    """A variant's axes: its own first, then the shared ones it does not redefine."""
    return {**variant.space, **{k: axis for k, axis in spec.space.items() if k not in variant.space}}


def describe(trials: list[Trial]) -> str:
    """The trial list `--dry-run` prints: one line per trial with the values of its axes."""
    width = max(len(t.name) for t in trials)
    lines = [f"{len(trials)} trials"]
    for i, t in enumerate(trials):
        values = "  ".join(f"{k}={_label(v)}" for k, v in t.values.items())
        lines.append(f"{i:>4}  {t.name:<{width}}  {values}")
    return "\n".join(lines)


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


def _absolute_paths(raw: dict, cwd: Path) -> None:
    """Make the recipe's local paths absolute (Tune workers run in their trial folders). A section or path of
    the wrong type is left as it is, for validation to name."""
    track, data = raw.setdefault("track", {}), raw.setdefault("data", {})
    uri = track.get("tracking_uri") if isinstance(track, dict) else None
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if isinstance(track, dict) and isinstance(uri, str):
        if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_absolute():
            uri = f"sqlite:///{cwd / uri.removeprefix('sqlite:///')}"
        elif "://" not in uri:
            uri = str(cwd / uri)
        track["tracking_uri"] = uri
    for key in ("root", "train", "val"):
        path = data.get(key) if isinstance(data, dict) else None
        if path and isinstance(path, str) and not Path(path).is_absolute():
            data[key] = str(cwd / path)


def _check_trials(trials: list[Trial], source: Path, spec: SweepSpec) -> None:
    """At least one trial, no two with one name, all logging to one MLflow experiment."""
    seen: set[str] = set()
    for trial in trials:
        if trial.name in seen:  # two values of one axis with one label (0.1 and 0.10001 both show as 0.1)
            own = spec.variants.get(trial.variant, Variant()).space
            axes = f"variants.{trial.variant}.space" if own else "space"
            raise SweepError(f"{axes}: two trials are both named {trial.name!r}; give the axes values that differ "
                             f"in their names", file=source)
        seen.add(trial.name)
    if not trials:
        raise SweepError("the sweep has no trials", file=source)
    destinations = {(t.recipe.track.tracking_uri, t.recipe.track.experiment) for t in trials}
    if len(destinations) > 1:
        raise SweepError(f"track.experiment / track.tracking_uri differ between trials ({sorted(destinations)[:2]}); "
                         f"a sweep logs to one experiment", file=source)
