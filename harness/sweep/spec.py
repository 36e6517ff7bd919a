"""The sweep file's schema (`SweepSpec`) and `load_sweep`, which reads and validates one.

A list is a grid axis; a `Distribution` is drawn once per trial (see `plan.expand`). Keys a variant sets
or sweeps are dotted recipe fields; a dotted key whose value is a mapping replaces that recipe section.
Numbers follow the recipe's rules (finite, not booleans, bounded); a sweep has at most `MAX_TRIALS` trials.
"""

import random
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, model_validator

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
    """A named alternative: dotted overrides and axes of its own (added to, or replacing, the shared ones)."""

    set: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, Axis] = Field(default_factory=dict)


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
        where = ".".join(str(p) if str(p).isprintable() else repr(p) for p in _field(error)) or "(top level)"
        allowed = f"; allowed: {', '.join(SweepSpec.model_fields)}" if error["type"] == "extra_forbidden" and \
            len(error["loc"]) == 1 else ""
        raise SweepError(f"{where}: {error['msg'].removeprefix('Value error, ')}{allowed}", file=path) from None


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
