"""A sweep's trials, expanded from its file: pure (no Ray, no MLflow, nothing written), so that `--dry-run`
lists exactly what runs.

Trials = for each variant in file order: the cross product of its axes (its own first, then the shared
ones it does not redefine; the last varies fastest) x `num_samples`, distributions drawn from one generator
seeded with `sample_seed` in trial order (also for variants left out by `--only`, so the others keep their
values). Overrides apply in the order base recipe, `set`, variant `set`, the trial's axis values, then the
command line's `-o`; every trial's recipe is validated here, before Ray starts. The tracking URI (recipe,
else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here) and data paths are made absolute, since Tune
workers run in their trial folders. A trial is named after its variant and axis values (`dsr_if-T=4-seed=0`).
"""

import itertools
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.recipe import Recipe, RecipeError, apply_override, validate_recipe
from harness.sweep.spec import SweepError, SweepSpec, Variant
from harness.yamlfile import read_yaml


@dataclass
class Trial:
    """One resolved trial: its name, variant, the axis values that made it, and its validated recipe."""

    name: str
    variant: str
    values: dict[str, Any]
    recipe: Recipe


def expand(spec: SweepSpec, source: str | Path, overrides: tuple[str, ...] = (),
           only: tuple[str, ...] = ()) -> list[Trial]:
    """Every trial of the sweep, in order, each recipe validated (RecipeError names the trial and field)."""
    source = Path(source)
    base_path = (source.parent / spec.recipe).resolve()
    if not base_path.is_file():
        raise SweepError(f"recipe: base recipe {spec.recipe!r} not found (looked at {base_path})", file=source)
    base = read_yaml(base_path, "base recipe", RecipeError) or {}
    variants = spec.variants or {"": Variant()}
    unknown = [name for name in only if name not in variants]
    if unknown:
        raise SweepError(f"--only: unknown variant {unknown[0]!r}; the file has: {', '.join(variants) or '(none)'}",
                         file=source)
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
                apply_override(raw, f"{key}={json.dumps(value)}", source=where)
            for override in overrides:
                apply_override(raw, override)
            _absolute_paths(raw, cwd)
            trials.append(Trial(name, variant_name, values, validate_recipe(raw, where)))
    _check_trials(trials, source)
    return trials


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


def _check_trials(trials: list[Trial], source: Path) -> None:
    """At least one trial, no two with one name, all logging to one MLflow experiment."""
    names = [t.name for t in trials]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise SweepError(f"two trials are both named {duplicate!r}: give them different variants or axes", file=source)
    if not trials:
        raise SweepError("the sweep has no trials", file=source)
    destinations = {(t.recipe.track.tracking_uri, t.recipe.track.experiment) for t in trials}
    if len(destinations) > 1:
        raise SweepError(f"track.experiment / track.tracking_uri differ between trials ({sorted(destinations)[:2]}); "
                         f"a sweep logs to one experiment", file=source)
