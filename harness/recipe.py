"""Recipes: one YAML file describes a whole run; this module is its typed schema (DESIGN.md).

`load_recipe(path, overrides)` reads the YAML with `yaml.safe_load`, applies dotted overrides
(`-o optim.lr=0.05`; values parsed as YAML scalars/lists), validates against `Recipe`, and fills in the
defaults that depend on other fields (DSR's IF/LIF defaults of DSR.md section 5). Every field has a
default stated here; unknown keys, wrong types and out-of-range values raise `RecipeError` with one line
`<file>: <field>: <what is allowed> (got <value>)`. Numbers are finite, never booleans, and bounded (the `MAX_*`
constants below), so that a typo such as `10**30` or `.inf` is refused before it reaches a run.
"""

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from harness.errors import HarnessError
from harness.yamlfile import read_yaml


class RecipeError(HarnessError):
    pass


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _not_a_boolean(value: Any) -> Any:
    """YAML's `true`/`false` are not the numbers 1 and 0 (which pydantic would otherwise take them for)."""
    if isinstance(value, bool):
        raise ValueError(f"a number, not a boolean (got {str(value).lower()})")
    return value


def _within(limit: float, why: str) -> AfterValidator:
    """A float at most `limit` in magnitude (`why`: where that limit comes from)."""
    def check(value: float) -> float:
        if abs(value) > limit:
            raise ValueError(f"must lie within ±{limit:.3g}, {why} (got {value:.3g})")
        return value
    return AfterValidator(check)


# Every number of a recipe or sweep is one of these: finite, never a boolean, a float within float32's range
# and an integer within a C int's, so that a typo such as 10**30 or .inf is refused here instead of reaching
# torch, numpy or an allocation. An integer type states all its bounds at once (nested bounds would all apply,
# and the message name the looser); `Real` is a float with no bounds, for fields that state their own.
MAX_INT = 2**31 - 1
MAX_FLOAT = 3.4028234663852886e38  # float32's largest: parameters, thresholds and optimizer steps are float32
MAX_LR = MAX_FLOAT / 10  # Adam's first step is lr / (1 - beta1) = 10 lr, and must fit float32
MAX_BATCH = 2**20  # a batch size: the data loaders hold a list as long as the batch
MAX_T = 1024  # time steps (and frames): the activations grow with T
MAX_PARALLEL = 1024  # loader workers and CPU threads per process
MAX_CLASSES = 100_000  # the output layer grows with it (ImageNet-21k has 21,841)
NotBoolean = BeforeValidator(_not_a_boolean)
InFloat32 = _within(MAX_FLOAT, "float32's range")
Real = Annotated[float, NotBoolean, Field(allow_inf_nan=False)]
FiniteFloat = Annotated[Real, InFloat32]
PositiveFloat = Annotated[Real, Field(gt=0), InFloat32]
NonNegativeFloat = Annotated[Real, Field(ge=0), InFloat32]
Int = Annotated[int, NotBoolean, Field(ge=-MAX_INT, le=MAX_INT)]
PositiveInt = Annotated[int, NotBoolean, Field(ge=1, le=MAX_INT)]
NonNegativeInt = Annotated[int, NotBoolean, Field(ge=0, le=MAX_INT)]
BatchSize = Annotated[int, NotBoolean, Field(ge=1, le=MAX_BATCH)]
TimeSteps = Annotated[int, NotBoolean, Field(ge=1, le=MAX_T)]


class DataConfig(Section):
    """Where the images come from. `dataset` names an entry of `harness.data.DATASETS`."""

    dataset: str = "mnist5k"
    root: str | None = None  # data folder for cifar10/cifar100/imagenet; embedded sets need none
    loader: Literal["auto", "torch", "ffcv"] = "auto"  # auto: ffcv where installed and .beton given
    train: str | None = None  # .beton file of the training split (loader ffcv)
    val: str | None = None  # .beton file of the validation split (loader ffcv)
    batch_size: BatchSize = 128  # global batch: split over the processes of a distributed run
    eval_batch_size: BatchSize | None = None  # default: batch_size
    workers: Annotated[int, NotBoolean, Field(ge=0, le=MAX_PARALLEL)] = 0  # loader processes per training process
    augment: bool = True  # the training augmentations of DSR.md section 5
    frames: TimeSteps | None = None  # frames per sample of an event data set (dvs_cifar10); must equal method.T
    # Tuning: hold out this fraction of the training split (a seeded random draw, torch loader) as the split every
    # evaluation reads; its metrics are logged as val/* and the test split is never read. None: evaluate on test/*
    holdout: Annotated[Real, Field(gt=0, lt=1)] | None = None
    holdout_seed: NonNegativeInt = 0  # the draw of the held-out samples (the same for every trial of a sweep)

    @property
    def eval_split(self) -> str:
        """The prefix of the evaluation metrics: `val` on a held-out part of the training data, else `test`."""
        return "val" if self.holdout is not None else "test"


class ModelConfig(Section):
    """The ANN backbone: a name in timm's registry (ours: preact_resnet18_cifar, preact_resnet18,
    preact_resnet34, vgg11_dvs, snn_convnet; or any timm CNN)."""

    backbone: str = "snn_convnet"
    num_classes: Annotated[int, NotBoolean, Field(ge=1, le=MAX_CLASSES)] | None = None  # default: the data set's
    drop_rate: Annotated[Real, Field(ge=0, lt=1)] = 0.0
    kwargs: dict[str, JsonValue] = Field(default_factory=dict)  # extra keyword arguments for timm.create_model


class ThresholdConfig(Section):
    """The firing threshold V of every DSR neuron (DSR.md sections 1 and 3)."""

    init: PositiveFloat | Literal["calibrate"] | None = None  # initial V; default IF 6.0, LIF 0.3; 'calibrate':
    # from the ANN's activations (method.init.calibrate)
    bound: PositiveFloat | None = None  # V_bound: V <- max(V, bound) before every forward; IF 0.01, LIF 5e-4
    grad_scale: NonNegativeFloat = 1.0  # k_V: 1 for CIFAR/DVS, 0.001 for ImageNet IF
    train: bool = True

    @field_validator("init", mode="before")
    @classmethod
    def _number_or_calibrate(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "calibrate":
            raise ValueError(f"a number > 0 or 'calibrate' (got {_shown(value)})")
        return value


class AnnMethod(Section):
    """The backbone trained as an ANN with ReLU (the accuracy DSR is compared with); logits are the output
    layer's pre-activation (harness/methods/ann.py says why)."""

    name: Literal["ann"] = "ann"


class CalibrateConfig(Section):
    """Thresholds from the ANN (DSR.md section 4): each layer's V = that percentile of its post-ReLU outputs on
    the first training batches of a new run (times dt for LIF)."""

    percentile: Annotated[Real, Field(gt=0, le=100)] = 99.9
    batches: PositiveInt = 5  # training batches the ANN sees


class InitConfig(Section):
    """DSR's hybrid start (DSR.md section 4): begin from a trained ANN of the same backbone."""

    ann_checkpoint: str | None = None  # a `method: ann` checkpoint of this backbone (best.pt / last.pt); BN included
    calibrate: CalibrateConfig | None = None  # set thresholds from the ANN; implies vth.init 'calibrate'


class DSRMethod(Section):
    """DSR (DSR.md): neurons IF or LIF, trained by differentiating the spike representation."""

    name: Literal["dsr"] = "dsr"
    neuron: Literal["if", "lif"] = "if"
    T: TimeSteps = 4
    alpha: Annotated[Real, Field(gt=0, le=1)] | None = None  # firing factor; IF 0.5, LIF 0.3
    vth: ThresholdConfig = Field(default_factory=ThresholdConfig)
    tau: PositiveFloat = 1.0  # LIF membrane constant (fixed)
    dt: PositiveFloat | None = None  # LIF step length; default 0.05
    init: InitConfig = Field(default_factory=InitConfig)  # hybrid start; default: random weights, vth.init
    # How the backward is computed (harness/snn/representation.py): `exact` backpropagates through the T*B
    # samples; `representation` computes it at batch B on the spike representations (same loss and, for IF,
    # the same gradients; autograd memory independent of T)
    backward: Literal["exact", "representation"] = "exact"
    # representation backward only: also record, for each conv/linear layer feeding a train-mode batch norm, the
    # time covariance its weight gradient needs (exact gradients for IF; one weight-gradient pass over T*B).
    # false: faster and biased (issue 12's note measures both)
    time_covariance: bool = True
    # spikes (the paper's network): the output layer ends in a DSR neuron and the logits are its spike
    # representation, which takes only T+1 values per class for IF at a fixed threshold; analog: the output
    # layer has no neuron and the logits are its output decoded as the neurons decode (rate / weighted rate),
    # as SG's `readout: analog` (STBP-tdBN, TET). Tables state each row's readout.
    readout: Literal["spikes", "analog"] = "spikes"

    @model_validator(mode="after")
    def _neuron_defaults(self) -> "DSRMethod":
        lif = self.neuron == "lif"
        if not self.time_covariance and self.backward == "exact":
            raise ValueError("time_covariance: false applies to backward: representation only (exact mode's "
                             "gradients always hold it); drop it or set backward: representation")
        if self.init.calibrate is not None and self.vth.init not in (None, "calibrate"):
            raise ValueError(f"vth.init is {self.vth.init} but init.calibrate is set; use vth.init: calibrate "
                             f"or drop init.calibrate")
        if self.vth.init == "calibrate" or self.init.calibrate is not None:
            self.vth.init = "calibrate"
            self.init.calibrate = self.init.calibrate or CalibrateConfig()
        if self.alpha is None:
            self.alpha = 0.3 if lif else 0.5
        if self.vth.init is None:
            self.vth.init = 0.3 if lif else 6.0
        if self.vth.bound is None:
            self.vth.bound = 5e-4 if lif else 0.01
        if self.dt is None:
            self.dt = 0.05
        return self


class SurrogateConfig(Section):
    """The surrogate derivative of the spike (harness/snn/surrogate.py)."""

    name: Literal["rectangular", "triangle", "arctan"] = "triangle"  # STBP's, TET's, SpikingJelly's ATan
    width: PositiveFloat = 1.0  # rectangular window / triangle half-base (TET's gamma)
    slope: PositiveFloat = 2.0  # arctan steepness (SpikingJelly's alpha)


class SGMethod(Section):
    """Direct training: 0/1-spike IF or LIF neurons, surrogate gradients, backpropagation through time."""

    name: Literal["sg"] = "sg"
    neuron: Literal["if", "lif"] = "lif"
    T: TimeSteps = 4
    vth: PositiveFloat = 1.0  # threshold V (fixed)
    leak: Annotated[Real, Field(gt=0, le=1)] = 0.5  # LIF: u_t = leak*u_{t-1} + x_t (TET's code: 0.5); IF: 1
    reset: Literal["hard", "soft"] = "hard"  # hard: u -> 0 after a spike (STBP, TET); soft: u -> u - V
    detach_reset: bool = False  # no gradient through the reset
    surrogate: SurrogateConfig = Field(default_factory=SurrogateConfig)
    loss: Literal["sdt", "tet"] = "sdt"  # sdt: CE of the time-averaged output; tet: mean over t of per-step CE
    tet_lambda: Annotated[Real, Field(ge=0, le=1)] = 1e-3  # tet: (1-lambda)*CE_TET + lambda*MSE(O_t, phi)
    tet_phi: FiniteFloat = 1.0  # tet: the MSE's constant target
    tdbn: bool = False  # threshold-dependent BN (Zheng et al. 2021): every BN weight starts at alpha_bn * vth
    alpha_bn: PositiveFloat = 1.0  # tdbn's alpha
    readout: Literal["analog", "spikes"] = "analog"  # analog: the output layer has no neuron, logits = time mean
    # of its BN1d output (STBP-tdBN, TET); spikes: logits = rate of its 0/1 spikes


class QCFSMethod(Section):
    """ANN-to-SNN conversion (Bu et al., ICLR 2022): train with QCFS activations, evaluate the IF conversion."""

    name: Literal["qcfs"] = "qcfs"
    T: TimeSteps = 4  # the latency whose SNN accuracy is the run's test/acc1
    L: PositiveInt = 4  # quantization levels of QCFS
    lambda_init: PositiveFloat = 8.0  # initial clip lambda of every layer (trainable)
    eval_T: Annotated[list[TimeSteps], Field(min_length=1)] = Field(
        default_factory=lambda: [1, 2, 4, 8, 16, 32])  # the SNN is evaluated at each: test/acc1_T{T}


Method = Annotated[AnnMethod | DSRMethod | SGMethod | QCFSMethod, Field(discriminator="name")]
_METHODS: dict[str, type[Section]] = {"ann": AnnMethod, "dsr": DSRMethod, "sg": SGMethod, "qcfs": QCFSMethod}
IMAGE_ONLY_METHODS = ("ann", "qcfs")  # their networks take one image per sample, not a sequence of frames


def method_section(raw: dict[str, Any]) -> Method:
    """A validated `method` section (defaults filled in) from its mapping, e.g. `{"name": "dsr", "T": 4}`."""
    return TypeAdapter(Method).validate_python(raw)


class OptimConfig(Section):
    """Optimizer and schedule: cosine over epochs with linear warm-up by iterations (DSR.md section 5).
    Weight decay applies to every parameter, thresholds, BN and biases included, as in the reference."""

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: Annotated[Real, Field(gt=0), _within(MAX_LR, "as Adam's first step (10 lr) must fit float32")] = 0.1
    momentum: Annotated[Real, Field(ge=0, lt=1)] = 0.9  # sgd only
    nesterov: bool = False
    weight_decay: NonNegativeFloat = 5e-4
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_iters: NonNegativeInt = 0
    epochs: PositiveInt = 10
    grad_clip: PositiveFloat | None = None  # max global grad norm
    skip_nonfinite: bool = False  # skip a step whose loss or gradient is NaN/inf (counted) instead of stopping
    max_skips_in_a_row: PositiveInt = 10  # with skip_nonfinite: stop after this many skipped steps in a row


class DeepSpeedConfig(Section):
    """DeepSpeed settings (engine.kind deepspeed). The three batch numbers are always derived from the recipe:
    train_batch_size = data.batch_size = micro batch per process * engine.grad_accum * processes."""

    stage: Annotated[int, NotBoolean, Field(ge=0, le=3)] = 2  # ZeRO stage
    offload_optimizer: bool = False  # ZeRO >= 1: optimizer states (and the step) on the CPU
    offload_param: bool = False  # ZeRO 3 only: parameters on the CPU
    config: str | None = None  # a full DeepSpeed JSON file; its batch, precision and clipping fields must agree
    # with the recipe (data.batch_size, engine.precision, optim.grad_clip), which fills in the ones it lacks


class EngineConfig(Section):
    """Where and how the steps run: one process, DDP, or DeepSpeed (harness/engine/distributed.py)."""

    kind: Literal["single", "ddp", "deepspeed"] = "single"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda where available
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast on CUDA; bf16 autocast on CPU
    threads: Annotated[int, NotBoolean, Field(ge=1, le=MAX_PARALLEL)] | None = None  # torch's default: None
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # process-group backend; auto: nccl on CUDA, else gloo
    sync_bn: bool = False  # batch norm statistics over the global batch (all processes)
    grad_accum: PositiveInt = 1  # micro-batches per optimizer step; data.batch_size stays the global batch
    timeout_s: PositiveInt = 1800  # collective timeout: a hung or lost process fails the run after this
    checkpoint_every: NonNegativeInt = 0  # steps between mid-epoch checkpoints (0: only at the end of each epoch)
    # DSR neuron time loop (harness/snn/kernels): fused kernel where one runs, plain loop; same spikes either way
    neuron_kernel: Literal["auto", "plain", "fused"] = "auto"
    compile: bool = False  # torch.compile the training step (forward, loss, backward)
    channels_last: bool = False  # model and input batches in channels-last memory layout (faster convolutions on CUDA)
    # CUDA only (no effect on the CPU): cuDNN's autotuner for the fixed shapes of a run, TF32 for fp32 matmuls and
    # convolutions (10-bit mantissa products, fp32 sums), torch's fused (one kernel per step) SGD/Adam/AdamW
    cudnn_benchmark: bool = True
    tf32: bool = True
    fused_optimizer: bool = True
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)


class TrackConfig(Section):
    """MLflow tracking and run outputs."""

    experiment: str = "dsr-harness"
    tracking_uri: str | None = None  # else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the cwd
    run_name: str | None = None  # default: the recipe name
    output_dir: str = "runs"  # checkpoints go to <output_dir>/<name>/<timestamp>/
    tags: dict[str, str] = Field(default_factory=dict)


class EfficiencyConfig(Section):
    """Energy per operation for the efficiency metrics of every evaluation (harness/snn/stats.py): the 45 nm
    figures the SNN literature uses (Horowitz 2014), one 32-bit float multiply-accumulate and accumulate."""

    mac_pj: PositiveFloat = 4.6  # picojoules per multiply-accumulate (analog layers, the ANN)
    ac_pj: PositiveFloat = 0.9  # picojoules per accumulate (spike-driven synaptic operations)


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
    efficiency: EfficiencyConfig = Field(default_factory=EfficiencyConfig)

    @property
    def T(self) -> int | None:
        """Time steps of a spiking method, None for the ANN."""
        return getattr(self.method, "T", None)

    @model_validator(mode="after")
    def _frames_fit_the_method(self) -> "Recipe":
        if self.data.frames is not None and self.method.name in IMAGE_ONLY_METHODS:
            raise ValueError(f"method.name: {self.method.name} takes single images, but data.frames "
                             f"({self.data.frames}) makes every sample a sequence of frames; use dsr or sg")
        if self.data.frames is not None and self.data.frames != self.T:
            raise ValueError(f"data.frames: must equal method.T ({self.T}): step t of the network sees frame t "
                             f"(got {self.data.frames})")
        return self


def apply_override(raw: dict, override: str, source: str = "-o") -> None:
    """Set `key.path=value` in the nested dict `raw`; the value is parsed as YAML (`0.05`, `[1, 2]`, `true`)."""
    if "=" not in override:
        raise RecipeError(f"{source} {override!r}: expected key.path=value")
    path, text = override.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise RecipeError(f"{source} {override!r}: value is not valid YAML ({str(e).splitlines()[0]})") from None
    set_field(raw, path, value, f"{source} {override!r}")


def set_field(raw: dict, path: str, value: Any, source: str) -> None:
    """Set the dotted `path` (`optim.lr`) of the nested dict `raw` to `value`, making the sections it lacks;
    a `RecipeError` starts with `source` (the override, or the sweep trial that sets it)."""
    keys = path.strip().split(".")
    if not all(keys):
        raise RecipeError(f"{source}: empty key in {path!r}")
    node = raw
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"{source}: {'.'.join(keys[:i + 1])} is not a section")
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


def _shown(value: Any, limit: int = 80) -> str:
    """`repr(value)`, cut to `limit` characters (a value can be a long list)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def _describe(error: dict, raw: dict) -> str:
    """One line for pydantic's `error`: the dotted field, then what is allowed (and the value given)."""
    method_name = (raw.get("method") or {}).get("name") if isinstance(raw.get("method"), dict) else None
    kind = error["type"]
    *parents, last = error["loc"] or ("",)
    # drop pydantic's union-member labels ("function-after[...]", "literal['calibrate']") from the path; the last
    # element of an unknown or non-string key is the user's own key, shown quoted where it is not a plain word
    loc = [str(p) for p in parents if isinstance(p, int) or str(p).isidentifier()]
    if kind in ("extra_forbidden", "invalid_key") and not str(last).isidentifier():
        loc.append(_shown(last))
    elif isinstance(last, int) or str(last).isidentifier():
        loc.append(str(last))
    if len(loc) > 1 and loc[0] == "method" and loc[1] in _METHODS:
        del loc[1]
    field = ".".join(loc) or "(top level)"
    got = error.get("input")
    if kind == "extra_forbidden":
        section = _section_at(loc[:-1], method_name)
        allowed = f"; allowed: {', '.join(section.model_fields)}" if section else ""
        return f"{field}: unknown key{allowed}"
    if kind == "invalid_key":
        return f"{field}: a key must be a string (a name)"
    if kind == "invalid-json-value":  # model.kwargs; the path is cut at pydantic's first 'list'/'dict' label
        field = ".".join(loc[:next((i for i, p in enumerate(loc) if p in ("list", "dict")), len(loc))])
        return f"{field}: plain data only: strings, numbers, booleans, null, lists, mappings (got {_shown(got)})"
    if kind == "union_tag_invalid":
        return f"{field}.name: unknown method {error['ctx']['tag']!r}; allowed: {', '.join(_METHODS)}"
    if kind == "value_error":
        message = error['msg'].removeprefix('Value error, ')
        return f"{field}: {message}" if loc else message  # a cross-section check names its fields itself
    got_text = "" if isinstance(got, dict) else f" (got {_shown(got)})"
    return f"{field}: {error['msg']}{got_text}"


def validate_recipe(raw: Any, source: str) -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError(f"a recipe is a YAML mapping of sections, got {type(raw).__name__}", file=source)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(_describe(e.errors()[0], raw), file=source) from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe file; `RecipeError` names the file and the field."""
    raw = read_yaml(path, "recipe", RecipeError)
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
