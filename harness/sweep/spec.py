"""The sweep file's schema (`SweepSpec`) and `load_sweep`, which reads and validates one.

A list is a grid axis; a `Distribution` is drawn once per trial (see `plan.expand`). Keys a variant sets
or sweeps are dotted recipe fields; a dotted key whose value is a mapping replaces that recipe section.
Numbers follow the recipe's rules (finite, not booleans, bounded); a sweep has at most `MAX_TRIALS` trials.
"""

import random
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from harness.errors import HarnessError
from harness.recipe import (
    MAX_PARALLEL,
    FiniteFloat,
    InFloat32,
    Int,
    NonNegativeInt,
    NotBoolean,
    PositiveFloat,
    PositiveInt,
    Real,
    Section,
)
from harness.yamlfile import read_yaml

_NAME_PATTERN = r"^[A-Za-z0-9_.\-]+$"
MAX_TRIALS = 10_000  # every trial's recipe is resolved and validated before Ray starts


class SweepError(HarnessError):
    pass


class Distribution(Section):
    """One random axis: exactly one of the keys, drawn independently for each trial."""

    uniform: tuple[FiniteFloat, FiniteFloat] | None = None  # [low, high]
    loguniform: tuple[PositiveFloat, PositiveFloat] | None = None  # [low, high], log-uniform
    randint: tuple[Int, Int] | None = None  # [low, high): an integer
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
    """A named alternative: dotted overrides and axes of its own (added to, or replacing, the shared ones), and
    in a tuned sweep its own search space `tune` (added to, or replacing, the shared one)."""

    set: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, Axis] = Field(default_factory=dict)
    tune: dict[str, Axis] = Field(default_factory=dict)


class TuningConfig(Section):
    """Stage 1 of a tuned sweep (`harness.sweep.tuned`): in every cell (a variant at one point of its grid, e.g.
    dsr_if at T=4), `trials` configurations drawn from the variant's `tune` space, trained on the training data
    less a held-out validation part and compared by ASHA within the cell on `metric`."""

    trials: Annotated[int, NotBoolean, Field(ge=1, le=MAX_TRIALS)]  # per cell: the budget every method gets
    holdout: Annotated[Real, Field(gt=0, lt=1)] = 0.2  # fraction of the training data held out to validate on
    holdout_seed: NonNegativeInt = 0  # which samples (the same for every trial)
    seed: NonNegativeInt = 0  # the recipe seed of every tuning trial
    metric: str = "val/acc1"  # what ASHA and the final choice compare (a val/* metric: never the test split)
    mode: Literal["max", "min"] = "max"
    grace_period: PositiveInt = 1  # epochs before ASHA may stop a trial
    reduction_factor: Annotated[Real, Field(gt=1), InFloat32] = 3.0  # ASHA keeps 1/reduction_factor per rung

    @field_validator("metric")
    @classmethod
    def _validation_metric(cls, metric: str) -> str:
        if not metric.startswith("val/"):
            raise ValueError(f"{metric!r} is not a validation metric; tuning compares val/* metrics (the held-out "
                             f"part of the training data), so the test split never chooses")
        return metric


class FinalConfig(Section):
    """Stage 2 of a tuned sweep: each cell's chosen configuration trained on the whole training data once per
    seed, evaluated on the test split."""

    seeds: Annotated[list[NonNegativeInt], Field(min_length=1)] = Field(default_factory=lambda: [0, 1, 2])


class SchedulerConfig(Section):
    """Tune's trial scheduler: FIFO runs every trial to the end; ASHA stops the worse ones at rungs."""

    kind: Literal["fifo", "asha"] = "fifo"
    metric: str = "test/acc1"  # a metric every epoch reports (also ranks the trials in the summary)
    mode: Literal["max", "min"] = "max"
    grace_period: PositiveInt = 1  # asha: epochs before a trial may be stopped
    reduction_factor: Annotated[Real, Field(gt=1), InFloat32] = 2.0  # asha: keep 1/reduction_factor at each rung


class ResourcesConfig(Section):
    """What one trial holds; also sets a trial's torch CPU threads when its recipe leaves `engine.threads` unset."""

    cpu: Annotated[Real, Field(gt=0, le=MAX_PARALLEL)] = 1.0  # (engine.threads, which it may set, has that bound)
    gpu: Annotated[Real, Field(ge=0, le=MAX_PARALLEL)] = 0.0


class SweepSpec(Section):
    """A sweep file; see the package docstring (`harness.sweep`)."""

    name: Annotated[str, Field(min_length=1, pattern=_NAME_PATTERN)]
    recipe: str
    set: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, Axis] = Field(default_factory=dict)
    variants: dict[Annotated[str, Field(pattern=_NAME_PATTERN)], Variant] = Field(default_factory=dict)
    num_samples: Annotated[int, NotBoolean, Field(ge=1, le=MAX_TRIALS)] = 1
    sample_seed: NonNegativeInt = 0
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    max_concurrent: PositiveInt | None = None  # default: as many as the resources allow
    retries: NonNegativeInt = 0
    storage: str = "ray_results"
    tune: dict[str, Axis] = Field(default_factory=dict)  # tuned sweeps: the search space shared by every variant
    tuning: TuningConfig | None = None  # set: a tuned sweep (tuning stage, then final stage)
    final: FinalConfig = Field(default_factory=FinalConfig)  # tuned sweeps: the final stage

    @model_validator(mode="after")
    def _tuned(self) -> "SweepSpec":
        tunes = bool(self.tune) or any(v.tune for v in self.variants.values())
        if self.tuning is None:
            if tunes or "final" in self.model_fields_set:
                raise ValueError("tune / final apply to a tuned sweep: add a tuning section (tuning.trials, the "
                                 "configurations each cell gets)")
            return self
        seeds = [k for k in (self.space, *(v.space for v in self.variants.values())) if "seed" in k]
        if seeds:
            raise ValueError("space.seed: a tuned sweep's seeds are final.seeds (tuning runs with tuning.seed)")
        if self.num_samples != 1:
            raise ValueError(f"num_samples: {self.num_samples}; a tuned sweep draws tuning.trials configurations "
                             f"per cell instead")
        if self.scheduler != SchedulerConfig():
            raise ValueError("scheduler: a tuned sweep runs ASHA within each cell from tuning.* (metric, mode, "
                             "grace_period, reduction_factor) and its final stage to the end; drop scheduler")
        for name, variant in self.variants.items():
            shared = {k for k in variant.space} | {k for k in self.space}
            both = sorted(shared & ({*variant.tune} | {*self.tune}))
            if both:
                raise ValueError(f"variants.{name}: {both[0]!r} is both a grid axis (space) and tuned (tune)")
        return self


def load_sweep(path: str | Path) -> SweepSpec:
    """The validated sweep file; `SweepError` names the file and the field."""
    path = Path(path)
    raw = read_yaml(path, "sweep", SweepError)
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else type(raw).__name__
        raise SweepError(f"a sweep is a YAML mapping (name, recipe, space, ...), got {got}", file=path)
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as e:
        error = _first_relevant(e.errors())
        where = ".".join(str(p) if str(p).isprintable() else repr(p) for p in _field(error))
        allowed = f"; allowed: {', '.join(SweepSpec.model_fields)}" if error["type"] == "extra_forbidden" and \
            len(error["loc"]) == 1 else ""
        message = error["msg"].removeprefix("Value error, ")  # a check of the whole file names its fields itself
        raise SweepError(f"{where}: {message}{allowed}" if where else message, file=path) from None


def _field(error: dict) -> list:
    """The field of a pydantic error: its location without the labels of union members and dict keys (a user's
    key is kept as written; `load_sweep` quotes it where it is not printable text, such as a line break)."""
    return [p for p in error["loc"] if not str(p).startswith(("list[", "function-", "Distribution", "[key]"))]


def _first_relevant(errors: list[dict]) -> dict:
    """The first error, or for an axis (a list or a Distribution) the one of the form it was given in: a
    mapping's Distribution error rather than 'Input should be a valid list'."""
    first = _field(errors[0])
    same_field = [error for error in errors if _field(error)[:len(first)] == first]
    return next((error for error in same_field if error["type"] not in ("list_type", "model_type")), errors[0])
