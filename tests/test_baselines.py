"""Baselines on the same backbone: surrogate-gradient BPTT (sg), QCFS conversion (qcfs), DSR's hybrid start.

Expected values are computed by hand (chain rule written out step by step) or from the papers' formulas
with torch primitives, never by calling the code under test a second way. Trained models are tiny
(snn_convnet on scikit-learn's 8x8 digits, a few seconds); MLflow is a real sqlite store in tmp_path.
"""

import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from torch import nn

from harness import methods
from harness.cli import main as cli
from harness.data import DATASETS, DataSplits, build_datasets, register_dataset
from harness.data.embedded import NormalisedImages
from harness.engine.context import RunContext
from harness.engine.distributed import ProcessInfo
from harness.engine.launch import launch
from harness.engine.precision import Precision
from harness.methods.base import DataInfo
from harness.methods.sg import tet_loss
from harness.recipe import RecipeError, flatten, load_recipe, validate_recipe
from harness.snn import QCFS, SGIF, SGLIF, ConversionIF, SpikingNeuron, convert_qcfs
from harness.snn.surrogate import arctan, rectangular, spike, surrogate_derivative, triangle

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
MNIST5K = ["ann", "dsr_if", "dsr_lif", "sg_sdt", "sg_tet", "qcfs"]
DIGITS_INFO = DataInfo(num_classes=10, input_shape=(1, 8, 8))


@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    splits = build_datasets("digits", None)
    return splits.train.images, torch.tensor(splits.train.targets), splits.val.images, torch.tensor(splits.val.targets)


def tiny_digits(root, augment) -> DataSplits:
    """The first 256 training and 64 validation digits: one epoch is 4 steps of 64."""
    full = build_datasets("digits", root, augment)
    train, val = full.train, full.val
    return DataSplits(NormalisedImages(train.images[:256], train.targets[:256]),
                      NormalisedImages(val.images[:64], val.targets[:64]),
                      full.num_classes, full.input_shape, full.mean, full.std)


if "digits_tiny" not in DATASETS:
    register_dataset("digits_tiny")(tiny_digits)


def run_context(train_loader) -> RunContext:
    """What a method hook sees of a one-process fp32 run on the CPU."""
    return RunContext(torch.device("cpu"), ProcessInfo(), Precision("fp32", "cpu"), train_loader, [], 10)


def build(method: dict, **model):
    recipe = validate_recipe({"name": "t", "model": {"backbone": "snn_convnet", **model}, "method": method}, "t.yaml")
    return methods.build(recipe.model, recipe.method, DIGITS_INFO)


def train(model: nn.Module, digits, epochs: int, lr: float = 0.05) -> nn.Module:
    x, y, _, _ = digits
    torch.manual_seed(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(y)).split(64):
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


# ---------------------------------------------------------------- surrogate gradients (sg)
def test_surrogate_derivatives_at_hand_picked_points():
    x = torch.tensor([-0.3, -0.2, 0.0, 0.1, 0.3])
    # rectangular, width 0.5: 1/0.5 = 2 inside |x| < 0.25
    assert torch.equal(rectangular(x, width=0.5), torch.tensor([0.0, 2.0, 2.0, 2.0, 0.0]))
    # triangle, width 0.5: (0.5 - |x|)/0.25 clipped at 0
    assert torch.allclose(triangle(x, width=0.5), torch.tensor([0.8, 1.2, 2.0, 1.6, 0.8]))
    # arctan, slope 2: 1 / (1 + (pi x)^2)
    assert torch.allclose(arctan(x, slope=2.0), 1 / (1 + (math.pi * x) ** 2))
    # every surrogate integrates to 1 (a smoothed unit step)
    grid = torch.linspace(-2, 2, 400_001, dtype=torch.float64)
    for h in (surrogate_derivative("rectangular", width=0.7), surrogate_derivative("triangle", width=0.7)):
        assert torch.trapezoid(h(grid), grid).item() == pytest.approx(1.0, abs=1e-4)
    x.requires_grad_(True)
    s = spike(x, surrogate_derivative("triangle", width=0.5))
    assert torch.equal(s, torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0]))
    s.sum().backward()
    assert torch.allclose(x.grad, torch.tensor([0.8, 1.2, 2.0, 1.6, 0.8]))


def _bptt(neuron: SpikingNeuron, inputs: list[float], weights: list[float]):
    x = torch.tensor(inputs).reshape(len(inputs), 1).requires_grad_(True)
    spikes = neuron(x)
    (spikes.flatten() * torch.tensor(weights)).sum().backward()
    return spikes.flatten().tolist(), x.grad.flatten().tolist()


def test_if_hard_reset_triangle_bptt_equals_hand_computation():
    """IF, V=1, hard reset, triangle width 1, x_t = 0.6, loss = 1*s1 + 2*s2 + 3*s3.
    u1 = 0.6 (s1=0, h1 = 1-0.4 = 0.6); u2 = 1.2 (s2=1, h2 = 0.8), reset to 0; u3 = 0.6 (s3=0, h3 = 0.6).
    v_t = u_t (1 - s_t) so dv_t/du_t = (1 - s_t) - u_t h_t; u_{t+1} = v_t + x_{t+1}.
    dL/du3 = 3*0.6 = 1.8
    dL/du2 = 2*0.8 + 1.8 * ((1-1) - 1.2*0.8) = 1.6 - 1.728 = -0.128
    dL/du1 = 1*0.6 + (-0.128) * ((1-0) - 0.6*0.6) = 0.6 - 0.08192 = 0.51808
    With detach_reset dv_t/du_t = 1 - s_t: dL/du2 = 1.6 + 1.8*0 = 1.6, dL/du1 = 0.6 + 1.6*1 = 2.2."""
    spikes, grad = _bptt(SGIF(3, vth=1.0, reset="hard", surrogate="triangle", width=1.0), [0.6] * 3, [1, 2, 3])
    assert spikes == [0.0, 1.0, 0.0]
    assert grad == pytest.approx([0.51808, -0.128, 1.8], abs=1e-6)
    _, grad = _bptt(SGIF(3, vth=1.0, reset="hard", detach_reset=True, width=1.0), [0.6] * 3, [1, 2, 3])
    assert grad == pytest.approx([2.2, 1.6, 1.8], abs=1e-6)


def test_lif_soft_reset_arctan_bptt_equals_hand_computation():
    """LIF leak 0.5, V=1, soft reset, arctan slope 2 (h(x) = 1/(1+(pi x)^2)), x = (0.8, 0.9, 0.5),
    loss = s1 + 2 s2 + 3 s3.  u1 = 0.8 (s1=0); u2 = 0.4 + 0.9 = 1.3 (s2=1), v2 = 0.3; u3 = 0.15 + 0.5 = 0.65.
    v_t = u_t - V s_t so dv_t/du_t = 1 - h_t; u_{t+1} = 0.5 v_t + x_{t+1}."""
    h1, h2, h3 = (1 / (1 + (math.pi * d) ** 2) for d in (0.8 - 1, 1.3 - 1, 0.65 - 1))
    du3 = 3 * h3
    du2 = 2 * h2 + 0.5 * du3 * (1 - h2)
    du1 = 1 * h1 + 0.5 * du2 * (1 - h1)
    neuron = SGLIF(3, vth=1.0, leak=0.5, reset="soft", surrogate="arctan", slope=2.0)
    spikes, grad = _bptt(neuron, [0.8, 0.9, 0.5], [1, 2, 3])
    assert spikes == [0.0, 1.0, 0.0]
    assert grad == pytest.approx([du1, du2, du3], abs=1e-6)
    # rectangular width 1 with detach: dv/du = 1, every |u - V| < 0.5 here, so h = 1 throughout
    neuron = SGLIF(3, vth=1.0, leak=0.5, reset="soft", detach_reset=True, surrogate="rectangular", width=1.0)
    _, grad = _bptt(neuron, [0.8, 0.9, 0.5], [1, 2, 3])
    assert grad == pytest.approx([1 + 0.5 * (2 + 0.5 * 3), 2 + 0.5 * 3, 3], abs=1e-6)


def test_tet_loss_equals_its_formula():
    torch.manual_seed(0)
    T, B, C, lam, phi = 3, 5, 4, 0.2, 1.0
    steps, target = torch.randn(T, B, C), torch.randint(0, C, (B,))
    per_step_ce = [(torch.logsumexp(steps[t], dim=1) - steps[t, torch.arange(B), target]).mean() for t in range(T)]
    expected = (1 - lam) * sum(per_step_ce) / T + lam * ((steps - phi) ** 2).sum() / (T * B * C)
    assert tet_loss(steps, target, lam, phi).item() == pytest.approx(expected.item(), rel=1e-6)
    model = build({"name": "sg", "T": 3, "loss": "tet", "tet_lambda": lam, "tet_phi": phi})
    x = torch.randn(B, 1, 8, 8)
    loss, logits = model.forward_loss(x, target)
    out = model.model.forward_steps(x)
    assert out.shape == (T, B, 10)
    ce = sum((torch.logsumexp(out[t], 1) - out[t, torch.arange(B), target]).mean() for t in range(T)) / T
    assert loss.item() == pytest.approx(((1 - lam) * ce + lam * ((out - phi) ** 2).mean()).item(), rel=1e-5)
    assert torch.allclose(logits, out.mean(0), atol=1e-6)


def test_sg_model_spikes_are_binary_and_readout_is_analog():
    model = build({"name": "sg", "T": 2, "neuron": "if", "vth": 0.5}).model
    neurons = model.neurons()
    assert len(neurons) == 2 and all(isinstance(n, SGIF) for n in neurons)  # output layer has no neuron
    outputs = []
    hooks = [n.register_forward_hook(lambda _m, _i, o: outputs.append(o)) for n in neurons]
    model(torch.randn(4, 1, 8, 8))
    for h in hooks:
        h.remove()
    assert all(set(o.unique().tolist()) <= {0.0, 1.0} for o in outputs)
    assert isinstance(model.body.fc_act, nn.Identity)
    spikes_out = build({"name": "sg", "T": 2, "readout": "spikes"}).model
    assert isinstance(spikes_out.body.fc_act, SGLIF)


@pytest.mark.parametrize("tdbn, expected", [(True, 0.7 * 0.5), (False, 1.0)])
def test_tdbn_initialises_bn_weights_to_alpha_times_threshold(tdbn, expected):
    model = build({"name": "sg", "vth": 0.7, "tdbn": tdbn, "alpha_bn": 0.5}).model
    bns = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    assert len(bns) == 3
    assert all(torch.all(bn.weight == expected) for bn in bns)


# ---------------------------------------------------------------- QCFS conversion
def qcfs_formula(z: torch.Tensor, L: int, lam: float) -> torch.Tensor:
    return lam * torch.clamp(torch.floor(z * L / lam + 0.5) / L, 0, 1)


def test_qcfs_activation_equals_its_formula_and_has_straight_through_gradient():
    act = QCFS(L=4, lambda_init=2.0)
    assert act.lam.item() == 2.0 and QCFS().lam.item() == 8.0
    # by hand, L=4, lambda=2: levels 0, 0.5, 1, 1.5, 2; z=0.3 -> floor(0.6+0.5)=1 -> 0.5; z=0.2 -> floor(0.9)=0
    z = torch.tensor([-1.0, 0.2, 0.3, 1.3, 1.8, 5.0], requires_grad=True)
    out = act(z)
    assert out.tolist() == [0.0, 0.0, 0.5, 1.5, 2.0, 2.0]
    grid = torch.linspace(-3, 11, 2001)
    assert torch.equal(QCFS(L=8, lambda_init=8.0)(grid), qcfs_formula(grid, 8, 8.0))
    out.sum().backward()
    assert z.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]  # floor is straight-through inside [0, lambda]


@pytest.mark.parametrize("L, lam", [(4, 2.0), (8, 8.0), (3, 1.5)])
def test_converted_if_rate_at_T_equal_L_is_exactly_qcfs(L, lam):
    # dyadic grid (exact in floats) plus values between the levels
    z = torch.cat([torch.arange(-32, 96) * (lam / 64), torch.linspace(-1, 1.5 * lam, 997)])
    neuron = ConversionIF(T=L, vth=lam)
    spikes = neuron(z.repeat(L))
    assert set(spikes.unique().tolist()) <= {0.0, lam}
    rate = spikes.reshape(L, -1).mean(0)
    assert torch.allclose(rate, qcfs_formula(z, L, lam), atol=1e-6)
    # initial membrane lambda/2: an input of exactly lambda/2 fires at the first step
    assert neuron(torch.full((L, 1), lam / 2)).flatten()[0].item() == lam


def test_converted_snn_approaches_the_trained_ann_as_T_grows(digits):
    """Measured on a QCFS model trained for 2 epochs: the accuracy gap ANN - SNN falls from T=1 (no spike
    has reached the output yet) through T=2 to T=L=4, and from T=4 on stays within 3 points. (The logit
    error is smallest at T=L; for T -> inf the IF rates tend to clamp(mean input, 0, lambda), the
    unquantized clip, so the SNN does not converge to the quantized ANN exactly: Bu et al.'s claim is
    the accuracy, which is what is asserted.)"""
    model = build({"name": "qcfs", "L": 4, "lambda_init": 4.0})
    ann = train(model.model, digits, epochs=2)
    _, _, x_val, y_val = digits
    with torch.no_grad():
        ann_logits = ann(x_val)
        snn = convert_qcfs(ann, 32).eval()
        steps = snn.forward_steps(x_val)
    assert not any(isinstance(m, QCFS) for m in snn.modules())
    ann_acc = (ann_logits.argmax(1) == y_val).float().mean().item()
    gaps = {T: ann_acc - (steps[:T].mean(0).argmax(1) == y_val).float().mean().item() for T in (1, 2, 4, 8, 16, 32)}
    assert ann_acc > 0.85
    assert gaps[1] > 0.5 and gaps[1] > gaps[2] > gaps[4]
    assert all(abs(gaps[T]) <= 0.03 for T in (4, 8, 16, 32)), gaps


def test_qcfs_headline_efficiency_is_its_snns_at_T(digits):
    """The qcfs run's `efficiency/*` and `firing_rate/mean` are those of its converted SNN at `method.T`
    (counted on the evaluation batches), not the ANN's: synaptic operations are spike-driven accumulates that
    grow with T and the only MACs left are the first layer's (analog input); the ANN's stay `efficiency/ann_*`."""
    from harness.snn.stats import FiringRateMonitor, dense_macs

    _, _, x_val, y_val = digits
    batches = [(x_val[:64], y_val[:64]), (x_val[64:128], y_val[64:128])]
    measured = {}
    for T in (1, 4):
        model = build({"name": "qcfs", "L": 4, "lambda_init": 4.0, "T": T, "eval_T": [T]})
        torch.manual_seed(0)
        ann = train(model.model, digits, epochs=1)
        context = RunContext(torch.device("cpu"), ProcessInfo(), Precision("fp32", "cpu"), [], batches, 10,
                             mac_pj=2.0, ac_pj=0.5)
        measured[T] = metrics = model.extra_eval(context)
        with torch.no_grad(), FiringRateMonitor(ann.eval()) as on_ann:
            for x, _y in batches:
                ann(x)
        ann_energy = on_ann.efficiency(2.0, 0.5)["efficiency/energy_uj"]
        assert metrics["efficiency/ann_energy_uj"] == pytest.approx(ann_energy)  # dense MACs, every layer
        first = next(m for m in ann.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
        with torch.no_grad():
            first_macs = dense_macs(first, first(x_val[:1]))  # one image through the first layer
        # the first layer alone is fed the analog image, once per step; every other layer is spike-driven
        assert metrics["efficiency/macs_per_sample"] == pytest.approx(T * first_macs)
        assert metrics["efficiency/energy_uj"] == pytest.approx(
            (metrics["efficiency/macs_per_sample"] * 2.0 + metrics["efficiency/sops_per_sample"] * 0.5) / 1e6)
        assert 0 < metrics["firing_rate/mean"] < 1
    assert measured[4]["efficiency/sops_per_sample"] > 2 * measured[1]["efficiency/sops_per_sample"]


# ---------------------------------------------------------------- DSR hybrid start
@pytest.fixture(scope="module")
def ann_checkpoint(digits, tmp_path_factory):
    ann = train(build({"name": "ann"}).model, digits, epochs=2)
    path = tmp_path_factory.mktemp("ann") / "best.pt"
    torch.save({"model": ann.state_dict(), "epoch": 2}, path)
    return path, ann


def relu_outputs(ann: nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Post-ReLU outputs of every activation place of the ANN; the `ann` method has an nn.Identity where
    the spiking topology has its output ReLU, so its ReLU is applied here."""
    outputs: dict[str, list[torch.Tensor]] = {}

    def keep(name):
        return lambda _m, _i, o: outputs.setdefault(name, []).append(o.clamp(min=0).flatten())

    hooks = [m.register_forward_hook(keep(name)) for name, m in ann.named_modules()
             if isinstance(m, (nn.ReLU, nn.Identity))]
    with torch.no_grad():
        for x in batches:
            ann(x)
    for h in hooks:
        h.remove()
    return {name: torch.cat(chunks) for name, chunks in outputs.items()}


@pytest.mark.parametrize("neuron, scale", [("if", 1.0), ("lif", 0.1)])
def test_calibrated_thresholds_are_the_percentile_of_the_ann_activations(digits, ann_checkpoint, neuron, scale):
    path, ann = ann_checkpoint
    x, y, _, _ = digits
    loader = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 64 * 6, 64)]
    model = build({"name": "dsr", "neuron": neuron, "T": 4, "dt": 0.1,
                   "init": {"ann_checkpoint": str(path), "calibrate": {"percentile": 99.0, "batches": 3}}})
    assert model.prepare is not None
    model.prepare(run_context(loader))
    activations = relu_outputs(ann, [b for b, _ in loader[:3]])
    neurons = dict(model.model.named_modules())
    assert len(activations) == 3
    for name, values in activations.items():
        expected = torch.quantile(values, 0.99).item() * scale
        assert neurons[f"body.{name}"].vth.item() == pytest.approx(expected, rel=1e-5)


def test_hybrid_start_first_forward_agrees_with_the_ann(digits, ann_checkpoint):
    """The SNN holds the ANN's weights; its layer l represents clamp(., 0, V_l) of its mean input, with rate
    error at most V_l/(2T) for inputs constant in time (DSR.md section 1: alpha = 0.5 rounds), and V_l at
    the 99.9th percentile clips only 0.1% of activations. So: (a) the first layer, whose input is the same
    image at every step, is within V_1/(2T) of the clipped ANN activation, exactly; (b) at the output the
    3 layers' errors add to a few per cent of the logit scale at T=32 (each layer <= 1/64 of its V) and
    shrink like 1/T (T=4 -> 32: at least 3 times smaller), whereas a mapping error (a weight or BN
    statistic not loaded, a threshold not set) gives errors of the order of the logits themselves and
    does not shrink with T. We allow 10% of the mean |logit| at T=32."""
    path, ann = ann_checkpoint
    x, y, x_val, _ = digits
    loader = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 64 * 5, 64)]
    errors = {}
    for T in (4, 32):
        model = build({"name": "dsr", "T": T, "init": {"ann_checkpoint": str(path), "calibrate": {}}})
        model.prepare(run_context(loader))
        snn = model.model.eval()
        first = snn.body.features.act1
        first_out: list[torch.Tensor] = []
        hook = first.register_forward_hook(lambda _m, _i, o, seen=first_out: seen.append(o))
        with torch.no_grad():
            snn_logits, ann_logits = snn(x_val), ann(x_val).clamp(min=0)  # the output ReLU of the SNN topology
            hook.remove()
            pre_act = ann.features.bn1(ann.features.conv1(x_val))
        v1 = first.vth.item()
        rate = first_out[0].reshape(T, *pre_act.shape).mean(0)
        assert (rate - pre_act.clamp(0, v1)).abs().max().item() <= v1 / (2 * T) + 1e-5
        errors[T] = (snn_logits - ann_logits).abs().mean().item() / ann_logits.abs().mean().item()
    assert errors[32] < 0.10 and errors[32] < errors[4] / 3  # measured: about 0.06 and 0.42


def test_ann_checkpoint_that_does_not_fit_is_a_one_line_error(tmp_path, ann_checkpoint):
    _, ann = ann_checkpoint
    extra, short = tmp_path / "extra.pt", tmp_path / "short.pt"
    torch.save({"model": {**ann.state_dict(), "extra.weight": torch.zeros(1)}}, extra)
    torch.save({k: v for k, v in ann.state_dict().items() if k != "fc.weight"}, short)
    cases = [(extra, "1 unexpected keys (e.g. 'extra.weight')"), (short, "1 missing keys (e.g. 'fc.weight')"),
             (tmp_path / "absent.pt", "file not found")]
    for bad, words in cases:
        with pytest.raises(RecipeError) as e:
            build({"name": "dsr", "init": {"ann_checkpoint": str(bad)}})
        assert str(bad) in str(e.value) and words in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(RecipeError, match="vth.init is 2.0 but init.calibrate is set"):
        validate_recipe({"name": "t", "method": {"name": "dsr", "vth": {"init": 2.0}, "init": {"calibrate": {}}}}, "t")


# ---------------------------------------------------------------- recipes
def test_new_recipes_pass_dry_run():
    names = [f"mnist5k_{m}_T4.yaml" for m in MNIST5K] + ["imagenet_resnet34_ann.yaml", "imagenet_resnet34_T5.yaml"]
    for name in names:
        result = CliRunner().invoke(cli, ["launch", str(RECIPES / name), "--dry-run"], standalone_mode=False)
        assert result.exit_code == 0 and f"name: {name.removesuffix('.yaml')}" in result.output, result.output
    hybrid = load_recipe(RECIPES / "imagenet_resnet34_T5.yaml").method
    assert hybrid.vth.init == "calibrate" and hybrid.init.calibrate.percentile == 99.9 and hybrid.T == 5


def test_mnist5k_recipes_differ_only_in_method_and_name():
    dumps = [load_recipe(RECIPES / f"mnist5k_{m}_T4.yaml").model_dump() for m in MNIST5K]
    for d in dumps:
        d.pop("method"), d.pop("name")
    assert all(d == dumps[0] for d in dumps)


@pytest.mark.slow
def test_each_mnist5k_recipe_runs_one_epoch_and_logs_its_knobs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_ids = {}
    for m in MNIST5K:
        overrides = ["optim.epochs=1", "data.dataset=digits_tiny", f"track.tracking_uri={uri}"]
        if m == "dsr_if":  # the hybrid start, from the ANN launched just before
            ann_ckpt = next((tmp_path / "runs" / "mnist5k_ann_T4").glob("*/best.pt"))
            overrides += [f"method.init.ann_checkpoint={ann_ckpt}", "method.vth.init=calibrate"]
        recipe = load_recipe(RECIPES / f"mnist5k_{m}_T4.yaml", overrides)
        summary = launch(recipe, echo=lambda *_: None)
        run = client.get_run(summary["mlflow_run_id"])
        assert run.info.status == "FINISHED" and summary["epochs"] == 1
        params = run.data.params
        method_params = {k: str(v) for k, v in flatten(recipe).items() if k.startswith("method.")}
        assert method_params.items() <= params.items()
        assert run.data.tags["method"] == recipe.method.name
        assert run.data.tags["T"] == ("none" if m == "ann" else "4")
        if m != "ann":
            assert params["method.T"] == "4"
        run_ids[m] = run
    sg_knobs = {"method.surrogate.name", "method.surrogate.width", "method.loss", "method.tdbn", "method.reset"}
    assert sg_knobs <= run_ids["sg_tet"].data.params.keys()
    assert run_ids["sg_tet"].data.params["method.loss"] == "tet"
    qcfs = run_ids["qcfs"].data.metrics
    assert {f"test/acc1_T{T}" for T in (1, 2, 4, 8, 16, 32)} | {"test/acc1_ann"} <= qcfs.keys()
    assert qcfs["test/acc1"] == qcfs["test/acc1_T4"]
    hybrid = run_ids["dsr_if"].data
    assert hybrid.params["method.init.calibrate.percentile"] == "99.9"
    assert all(v != 6.0 for k, v in hybrid.metrics.items() if k.startswith("vth/"))  # not the placeholder
