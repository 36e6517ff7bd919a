"""The sweep file's schema (`SweepSpec`) and `load_sweep`, which reads and validates one.

A list is a grid axis; a `Distribution` is drawn once per trial (see `plan.expand`). Keys a variant sets
or sweeps are dotted recipe fields; a dotted key whose value is a mapping replaces that recipe section.
"""

import random
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, model_validator

from harness.errors import HarnessError
from harness.recipe import NonNegativeInt, PositiveFloat, PositiveInt, Section
from harness.yamlfile import read_yaml

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
    """A sweep file; see the package docstring (`harness.sweep`)."""

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


def load_sweep(path: str | Path) -> SweepSpec:
    """The validated sweep file; `SweepError` names the file and the field."""
    path = Path(path)
    raw = read_yaml(path, "sweep", SweepError)
    if not isinstance(raw, dict):
        raise SweepError(f"a sweep is a YAML mapping (name, recipe, space, ...), got {type(raw).__name__}", file=path)
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as e:
        error = e.errors()[0]
        where = ".".join(str(p) for p in error["loc"] if not str(p).startswith(("list[", "Distribution")))
        allowed = f"; allowed: {', '.join(SweepSpec.model_fields)}" if error["type"] == "extra_forbidden" and \
            len(error["loc"]) == 1 else ""
        raise SweepError(f"{where}: {error['msg'].removeprefix('Value error, ')}{allowed}", file=path) from None
