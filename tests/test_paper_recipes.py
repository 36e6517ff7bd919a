"""The paper's CIFAR recipes (DSR.md section 5): each resolves as written, and runs one training step
on a tiny CIFAR set written in the real pickle format (the recipe unchanged but for data root, batch
size and epochs, so the real backbone, neurons, T and optimizer run)."""

from pathlib import Path

import pytest
from fakedata import write_cifar10, write_cifar100
from mlflow.tracking import MlflowClient

from harness.engine import checkpoint
from harness.engine.launch import launch
from harness.recipe import load_recipe

RECIPES = Path(__file__).parent.parent / "recipes"
PAPER = {
    "cifar10_preact18_dsr_if_T20": dict(neuron="if", T=20, lr=0.1, vth=6.0, alpha=0.5, bound=0.01),
    "cifar10_preact18_dsr_lif_T20": dict(neuron="lif", T=20, lr=0.1, vth=0.3, alpha=0.3, bound=5e-4, dt=0.05),
    "cifar10_preact18_dsr_if_T5": dict(neuron="if", T=5, lr=0.05, vth=6.0, alpha=0.5, bound=0.01),
    "cifar10_preact18_dsr_lif_T5": dict(neuron="lif", T=5, lr=0.05, vth=0.6, alpha=0.5, bound=1e-3, dt=0.1),
    "cifar100_preact18_dsr_if_T20": dict(neuron="if", T=20, lr=0.1, vth=6.0, alpha=0.5, bound=0.01),
}


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_recipe_states_dsr_md_settings(name):
    r = load_recipe(RECIPES / f"{name}.yaml")
    want = PAPER[name]
    m = r.method
    assert (m.name, m.neuron, m.T, m.alpha, m.vth.init, m.vth.bound, m.vth.grad_scale) == \
        ("dsr", want["neuron"], want["T"], want["alpha"], want["vth"], want["bound"], 1.0)
    if m.neuron == "lif":
        assert (m.tau, m.dt) == (1.0, want["dt"])
    o = r.optim
    assert (o.name, o.lr, o.momentum, o.weight_decay, o.schedule, o.warmup_iters, o.epochs) == \
        ("sgd", want["lr"], 0.9, 5e-4, "cosine", 400, 200)
    assert r.data.batch_size == 128 and r.data.augment and r.model.backbone == "preact_resnet18_cifar"
    assert r.model.num_classes == (100 if name.startswith("cifar100") else 10)


@pytest.mark.parametrize("name", list(PAPER))
@pytest.mark.slow
def test_paper_recipe_runs_one_step(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    if name.startswith("cifar100"):
        write_cifar100(tmp_path, train=2, test=2)
    else:
        write_cifar10(tmp_path, per_batch=1, test=2)  # 5 training images
    path = RECIPES / f"{name}.yaml"
    recipe = load_recipe(path, [f"data.root={tmp_path}", "data.batch_size=2", "data.workers=0",
                                "optim.epochs=1", f"track.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
                                f"track.output_dir={tmp_path}/runs"])
    summary = launch(recipe, echo=lambda *_: None)
    state = checkpoint.load(Path(summary["run_dir"]) / "last.pt")
    expected_steps = 1 if name.startswith("cifar100") else 2
    assert state["step"] == expected_steps and state["epoch"] == 1
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["T"] == str(PAPER[name]["T"])
    assert len([k for k in run.data.metrics if k.startswith("vth/")]) == 19
