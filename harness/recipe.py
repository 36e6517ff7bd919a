"""Recipes: one YAML file describes a whole run; this module is its typed schema (DESIGN.md).

`load_recipe(path, overrides)` reads the YAML with `yaml.safe_load`, applies dotted overrides
(`-o optim.lr=0.05`; values parsed as YAML scalars/lists), validates against `Recipe`, and fills in the
defaults that depend on other fields (DSR's IF/LIF defaults of DSR.md section 5). Every field has a
default stated here; unknown keys, wrong types and out-of-range values raise `RecipeError` with one line
`<file>: <field>: <what is allowed> (got <value>)`.
"""

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from harness.errors import HarnessError


class RecipeError(HarnessError):
    pass


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]


class DataConfig(Section):
    """Where the images come from. `dataset` names an entry of `harness.data.DATASETS`."""

    dataset: str = "mnist5k"
    root: str | None = None  # data folder for cifar10/cifar100/imagenet; embedded sets need none
    loader: Literal["auto", "torch", "ffcv"] = "auto"  # auto: ffcv where installed and .beton given
    train: str | None = None  # .beton file of the training split (loader ffcv)
    val: str | None = None  # .beton file of the validation split (loader ffcv)
    batch_size: PositiveInt = 128  # global batch: split over the processes of a distributed run
    eval_batch_size: PositiveInt | None = None  # default: batch_size
    workers: NonNegativeInt = 0  # loader worker processes per training process
    augment: bool = True  # the training augmentations of DSR.md section 5


class ModelConfig(Section):
    """The ANN backbone: a name in timm's registry (ours: preact_resnet18_cifar, preact_resnet18,
    preact_resnet34, vgg11_dvs, snn_convnet; or any timm CNN)."""

    backbone: str = "snn_convnet"
    num_classes: PositiveInt | None = None  # default: the data set's
    drop_rate: Annotated[float, Field(ge=0, lt=1)] = 0.0
    kwargs: dict[str, Any] = Field(default_factory=dict)  # extra keyword arguments for timm.create_model


class ThresholdConfig(Section):
    """The firing threshold V of every DSR neuron (DSR.md sections 1 and 3)."""

    init: PositiveFloat | None = None  # initial V; default IF 6.0, LIF 0.3
    bound: PositiveFloat | None = None  # V_bound: V <- max(V, bound) before every forward; IF 0.01, LIF 5e-4
    grad_scale: NonNegativeFloat = 1.0  # k_V: 1 for CIFAR/DVS, 0.001 for ImageNet IF
    train: bool = True


class AnnMethod(Section):
    """The backbone trained as an ANN with its activations (the accuracy DSR is compared with)."""

    name: Literal["ann"] = "ann"


class DSRMethod(Section):
    """DSR (DSR.md): neurons IF or LIF, trained by differentiating the spike representation."""

    name: Literal["dsr"] = "dsr"
    neuron: Literal["if", "lif"] = "if"
    T: PositiveInt = 4
    alpha: Annotated[float, Field(gt=0, le=1)] | None = None  # firing factor; IF 0.5, LIF 0.3
    vth: ThresholdConfig = Field(default_factory=ThresholdConfig)
    tau: PositiveFloat = 1.0  # LIF membrane constant (fixed)
    dt: PositiveFloat | None = None  # LIF step length; default 0.05

    @model_validator(mode="after")
    def _neuron_defaults(self) -> "DSRMethod":
        lif = self.neuron == "lif"
        if self.alpha is None:
            self.alpha = 0.3 if lif else 0.5
        if self.vth.init is None:
            self.vth.init = 0.3 if lif else 6.0
        if self.vth.bound is None:
            self.vth.bound = 5e-4 if lif else 0.01
        if self.dt is None:
            self.dt = 0.05
        return self


Method = Annotated[AnnMethod | DSRMethod, Field(discriminator="name")]
_METHODS: dict[str, type[Section]] = {"ann": AnnMethod, "dsr": DSRMethod}


class OptimConfig(Section):
    """Optimizer and schedule: cosine over epochs with linear warm-up by iterations (DSR.md section 5).
    Weight decay applies to every parameter, thresholds, BN and biases included, as in the reference."""

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: PositiveFloat = 0.1
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9  # sgd only
    nesterov: bool = False
    weight_decay: NonNegativeFloat = 5e-4
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_iters: NonNegativeInt = 0
    epochs: PositiveInt = 10
    grad_clip: PositiveFloat | None = None  # max global grad norm


class EngineConfig(Section):
    """Where and how the steps run."""

    kind: Literal["single", "ddp", "deepspeed"] = "single"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda where available
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast on CUDA; bf16 autocast on CPU
    threads: PositiveInt | None = None  # torch CPU threads per process (default: torch's)


class TrackConfig(Section):
    """MLflow tracking and run outputs."""

    experiment: str = "dsr-harness"
    tracking_uri: str | None = None  # else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the cwd
    run_name: str | None = None  # default: the recipe name
    output_dir: str = "runs"  # checkpoints go to <output_dir>/<name>/<timestamp>/
    tags: dict[str, str] = Field(default_factory=dict)


class Recipe(Section):
    """A whole run. `name` names it; everything else has a default."""

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")]
    seed: NonNegativeInt = 0
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: Method = Field(default_factory=AnnMethod)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    track: TrackConfig = Field(default_factory=TrackConfig)

    @property
    def T(self) -> int | None:
        """Time steps of a spiking method, None for the ANN."""
        return getattr(self.method, "T", None)


def apply_override(raw: dict, override: str, source: str = "-o") -> None:
    """Set `key.path=value` in the nested dict `raw`; the value is parsed as YAML (`0.05`, `[1, 2]`, `true`)."""
    if "=" not in override:
        raise RecipeError(f"{source} {override!r}: expected key.path=value")
    path, text = override.split("=", 1)
    keys = path.strip().split(".")
    if not all(keys):
        raise RecipeError(f"{source} {override!r}: empty key in {path!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise RecipeError(f"{source} {override!r}: value is not valid YAML ({str(e).splitlines()[0]})") from None
    node = raw
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"{source} {override!r}: {'.'.join(keys[:i + 1])} is not a section")
        node = child
    node[keys[-1]] = value


def _section_at(path: list[str], method_name: str | None) -> type[BaseModel] | None:
    """The schema class of the section at dotted `path` (for listing its allowed keys)."""
    section: type[BaseModel] = Recipe
    for key in path:
        if section is Recipe and key == "method":
            section = _METHODS.get(method_name, AnnMethod)
            continue
        field = section.model_fields.get(key)
        candidates = [a for a in getattr(field.annotation, "__args__", (field.annotation,)) if field] if field else []
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        section = nested[0]
    return section


def _describe(error: dict, raw: dict) -> str:
    method_name = (raw.get("method") or {}).get("name") if isinstance(raw.get("method"), dict) else None
    # drop pydantic's union-member labels ("constrained-float", "literal['calibrate']") from the path
    loc = [str(p) for p in error["loc"] if isinstance(p, int) or str(p).isidentifier()]
    if len(loc) > 1 and loc[0] == "method" and loc[1] in _METHODS:
        del loc[1]
    field = ".".join(loc) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        section = _section_at(loc[:-1], method_name)
        allowed = f"; allowed: {', '.join(section.model_fields)}" if section else ""
        return f"{field}: unknown key{allowed}"
    if kind == "union_tag_invalid":
        return f"{field}.name: unknown method {error['ctx']['tag']!r}; allowed: {', '.join(_METHODS)}"
    if kind == "value_error":
        return f"{field}: {error['msg'].removeprefix('Value error, ')}"
    got = error.get("input")
    got_text = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{field}: {error['msg']}{got_text}"


def validate_recipe(raw: Any, source: str) -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping of sections, got {type(raw).__name__}")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(f"{source}: {_describe(e.errors()[0], raw)}") from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe file; `RecipeError` names the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{path}:{where}: malformed YAML: {problem}") from None
    if raw is None:
        raw = {}
    for override in overrides:
        if not isinstance(raw, dict):
            break
        apply_override(raw, override)
    return validate_recipe(raw, str(path))


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def flatten(recipe: Recipe) -> dict[str, Any]:
    """`{"optim.lr": 0.1, ...}`: the resolved recipe as dotted keys (MLflow params, tables)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            flat[prefix] = node

    walk("", recipe.model_dump(mode="json"))
    return flat
