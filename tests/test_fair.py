"""Fair comparisons: DSR's readout, the held-out validation split, and tuned sweeps (an equal tuning budget per
cell, ASHA within each cell, then the chosen configurations trained with seeds and tabulated).

The end-to-end sweep runs on digits (8x8, fast) with Ray started locally and a real sqlite MLflow store; one
drill interrupts a tuned sweep in its tuning stage and `--resume`s it through both stages.
"""

import json
import signal
import time
from types import SimpleNamespace

import pytest
import torch
import yaml
from test_sweep import BASE as SWEEP_BASE
from test_sweep import _cli, _ended, _sweep_process, _tail, write

import harness.models  # noqa: F401
from harness.data.pipeline import build_pipeline
from harness.data.registry import DataError
from harness.methods import DataInfo, build
from harness.recipe import DataConfig, ModelConfig, method_section, validate_recipe
from harness.sweep import SweepError, expand, load_sweep
from harness.sweep.spec import TuningConfig
from harness.sweep.tuned import CellASHA, choose_from

BASE = {**SWEEP_BASE, "name": "digits_fair", "optim": {**SWEEP_BASE["optim"], "epochs": 2},
        "track": {"experiment": "fair"}}


# --------------------------------------------------------------------------------------------- readout
@pytest.mark.parametrize("neuron", ["if", "lif"])
def test_dsr_analog_readout_decodes_the_output_layer_without_a_neuron(neuron):
    """`readout: analog` removes exactly the output neuron; its logits are the output layer's pre-neuron values
    decoded as the neurons decode (rate / weighted rate). `spikes` (IF) logits take only T+1 values per class."""
    torch.manual_seed(0)
    T, info = 3, DataInfo(10, (1, 28, 28))
    spikes = build(ModelConfig(), method_section({"name": "dsr", "neuron": neuron, "T": T}), info).model.eval()
    analog = build(ModelConfig(), method_section({"name": "dsr", "neuron": neuron, "T": T, "readout": "analog"}),
                   info).model.eval()
    assert len(analog.neurons()) == len(spikes.neurons()) - 1
    own = analog.state_dict()
    analog.load_state_dict({k: v for k, v in spikes.state_dict().items() if k in own})  # all but the output's V
    last, captured = spikes.neurons()[-1], {}
    hook = last.register_forward_pre_hook(lambda _m, inputs: captured.__setitem__("z", inputs[0]))
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        spiking, decoded = spikes(x), analog(x)
    hook.remove()
    assert torch.allclose(decoded, spikes.decode(captured["z"]), rtol=1e-6, atol=1e-6)
    assert (decoded < 0).any()  # a pre-activation: not clamped to [0, V] as a spike rate is
    if neuron == "if":
        levels = spiking * T / last.vth.detach()  # rate of spikes of amplitude V: k*V/T, k = 0..T
        assert torch.allclose(levels, levels.round(), atol=1e-5) and levels.min() >= 0 and levels.max() <= T


def test_readout_is_a_run_tag():
    from harness.track import run_tags

    def tags(method):
        return run_tags(validate_recipe({**BASE, "method": method}, "r.yaml"))["readout"]

    assert tags({"name": "dsr"}) == "spikes" and tags({"name": "dsr", "readout": "analog"}) == "analog"
    assert tags({"name": "sg"}) == "analog" and tags({"name": "ann"}) == "analog" and tags({"name": "qcfs"}) == "analog"


# --------------------------------------------------------------------------------------------- holdout
def test_holdout_carves_a_seeded_unaugmented_validation_split_from_training_data():
    whole = build_pipeline(DataConfig(dataset="digits", batch_size=64), seed=0)
    n = whole.train_size  # 1,433 digits
    held = build_pipeline(DataConfig(dataset="digits", batch_size=64, holdout=0.2, holdout_seed=3), seed=0)
    train, val = held.train.dataset, held.val.dataset
    assert len(val) == round(0.2 * n) and len(train) + len(val) == n
    assert set(train.indices).isdisjoint(val.indices) and set(train.indices) | set(val.indices) == set(range(n))
    again = build_pipeline(DataConfig(dataset="digits", batch_size=64, holdout=0.2, holdout_seed=3), seed=5)
    other = build_pipeline(DataConfig(dataset="digits", batch_size=64, holdout=0.2, holdout_seed=4), seed=0)
    assert again.val.dataset.indices == val.indices != other.val.dataset.indices  # the holdout seed decides
    # the held-out samples are training images, read without augmentation (identical on every read)
    i = val.indices[0]
    plain = build_pipeline(DataConfig(dataset="digits", batch_size=64, augment=False), seed=0).train.dataset
    assert torch.equal(val[0][0], plain[i][0]) and torch.equal(val[0][0], val[0][0])
    test_images = {tuple(whole.val.dataset[j][0].flatten().tolist()) for j in range(len(whole.val.dataset))}
    assert not any(tuple(val[j][0].flatten().tolist()) in test_images for j in range(20))


def test_holdout_is_refused_with_the_ffcv_loader():
    with pytest.raises(DataError, match="data.holdout: 0.2 needs the torch loader"):
        build_pipeline(DataConfig(dataset="cifar10", loader="ffcv", train="a.beton", val="b.beton", holdout=0.2),
                       seed=0)


@pytest.mark.slow
def test_a_held_out_run_logs_val_metrics_and_never_reads_the_test_split(tmp_path, monkeypatch):
    from harness.engine.launch import launch
    from harness.track import find_runs

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recipe = validate_recipe({**BASE, "optim": {**BASE["optim"], "epochs": 1},
                              "data": {**BASE["data"], "holdout": 0.25},
                              "track": {"experiment": "fair", "tracking_uri": uri}}, "r.yaml")
    summary = launch(recipe, echo=lambda *_: None)
    assert summary["eval_split"] == "val" and 0 <= summary["final_val_acc1"] <= 100
    (run,) = find_runs(uri, "fair")
    assert {"val/acc1", "val/loss", "val/best_acc1"} <= set(run.metrics)
    assert not [k for k in run.metrics if k.startswith("test/")]


# ------------------------------------------------------------------------------------------ sweep file
def _tuned(tmp_path, **changes):
    write(tmp_path / "base.yaml", BASE)
    spec = {"name": "fair", "recipe": "base.yaml", "tune": {"optim.lr": {"loguniform": [0.01, 0.2]}},
            "variants": {"ann": {"set": {"method": {"name": "ann"}}},
                         "dsr": {"set": {"method": {"name": "dsr", "readout": "analog"}},
                                 "space": {"method.T": [1, 2]},
                                 "tune": {"method.alpha": {"uniform": [0.3, 1.0]}, "method.vth.init": [1.0, 2.0]}}},
            "tuning": {"trials": 3, "holdout": 0.2, "seed": 7}, "final": {"seeds": [0, 1]},
            "resources": {"cpu": 1}, "max_concurrent": 2, **changes}
    return write(tmp_path / "fair.yaml", spec)


def test_tuning_expands_the_same_budget_in_every_cell(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _tuned(tmp_path)
    trials = expand(load_sweep(path), path)
    assert [t.name for t in trials] == ["ann-c0", "ann-c1", "ann-c2", "dsr-T=1-c0", "dsr-T=1-c1", "dsr-T=1-c2",
                                        "dsr-T=2-c0", "dsr-T=2-c1", "dsr-T=2-c2"]
    assert {t.cell for t in trials} == {"ann", "dsr-T=1", "dsr-T=2"}
    for t in trials:  # every tuning trial validates on the held-out part with the tuning seed
        assert t.recipe.data.holdout == 0.2 and t.recipe.data.holdout_seed == 0 and t.recipe.seed == 7
        assert set(t.tuned) == ({"optim.lr"} if t.variant == "ann" else {"optim.lr", "method.alpha", "method.vth.init"})
        assert t.recipe.optim.lr == t.tuned["optim.lr"] and 0.01 <= t.recipe.optim.lr <= 0.2
    dsr = [t for t in trials if t.variant == "dsr"]
    assert all(t.recipe.method.readout == "analog" and t.recipe.method.vth.init in (1.0, 2.0) for t in dsr)
    assert all(t.recipe.method.alpha == t.tuned["method.alpha"] for t in dsr)
    # a cell's draws depend on its name only: the same with the other variant left out, and on every expansion
    only = expand(load_sweep(path), path, only=("dsr",))
    assert [t.tuned for t in only] == [t.tuned for t in dsr]
    assert len({t.recipe.optim.lr for t in trials}) == 9


@pytest.mark.parametrize("change,message", [
    ({"space": {"seed": [0, 1]}}, "space.seed: a tuned sweep's seeds are final.seeds"),
    ({"num_samples": 2}, "num_samples: 2; a tuned sweep draws tuning.trials"),
    ({"scheduler": {"kind": "asha"}}, "scheduler: a tuned sweep runs ASHA within each cell"),
    ({"tuning": {"trials": 2, "metric": "test/acc1"}}, "tuning.metric: 'test/acc1' is not a validation metric"),
    ({"tuning": {"holdout": 0.2}}, r"tuning.trials: Field required"),
    ({"tuning": None}, "tune / final apply to a tuned sweep: add a tuning section"),
])
def test_tuned_sweep_file_errors_name_the_field(tmp_path, change, message):
    path = _tuned(tmp_path, **change)
    if change.get("tuning", 1) is None:
        raw = yaml.safe_load(open(path))
        del raw["tuning"]
        write(tmp_path / "fair.yaml", raw)
    with pytest.raises(SweepError, match=message):
        load_sweep(path)


def test_dry_run_lists_the_tuning_trials_and_the_final_stage(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = _cli(monkeypatch, capsys, "sweep", _tuned(tmp_path), "--dry-run")
    assert code == 0, err
    assert out.splitlines()[0] == "9 trials" and "dsr-T=2-c2" in out
    assert out.splitlines()[-1] == ("tuning stage: 3 cells x 3 configurations on 0.2 of the training data held out "
                                    "(val/acc1, ASHA per cell); then the final stage: 3 cells x 2 seeds (0, 1) = 6 "
                                    "runs on the whole training data, evaluated on test")
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray_results").exists()  # nothing written


def test_the_committed_fair_sweep_gives_every_method_the_same_budget():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / "sweeps" / "mnist5k_fair.yaml"
    trials = expand(load_sweep(path), path)
    per_cell = {}
    for t in trials:
        per_cell.setdefault(t.cell, []).append(t)
    assert len(per_cell) == 21 and {len(ts) for ts in per_cell.values()} == {8}
    assert {(t.variant, t.recipe.T) for t in trials} == {("ann", None)} | {
        (v, T) for v in ("qcfs", "dsr_if", "dsr_lif", "sg_sdt", "sg_tet") for T in (1, 2, 4, 8)}
    readouts = {t.variant: getattr(t.recipe.method, "readout", "analog") for t in trials}
    assert set(readouts.values()) == {"analog"}  # all in one readout, as the table says
    shared = {k: v for k, v in trials[0].recipe.model_dump().items() if k in ("data", "model", "optim")}
    for t in trials:  # the same data, backbone and optimizer except the tuned learning rate
        same = {k: v for k, v in t.recipe.model_dump().items() if k in ("data", "model", "optim")}
        same["optim"]["lr"] = shared["optim"]["lr"]
        assert same == shared, t.name


def test_distributions_in_a_tuned_sweeps_space_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _tuned(tmp_path, space={"optim.momentum": {"uniform": [0.5, 0.9]}}, tune={})
    with pytest.raises(SweepError, match="space.optim.momentum: a tuned sweep's space is the grid of its cells"):
        expand(load_sweep(path), path)


# ---------------------------------------------------------------------------------- choice and ASHA
def _trials(cells: dict[str, int]) -> dict[str, dict]:
    return {f"{cell}-c{i}": {"cell": cell, "variant": cell.split("-")[0], "tuned": {"optim.lr": i / 10}}
            for cell, n in cells.items() for i in range(n)}


def test_the_choice_is_the_best_among_the_trials_that_ran_longest():
    trials = _trials({"a": 4, "b": 2})
    results = {"a-c0": {"epoch": 3, "val/acc1": 90.0}, "a-c1": {"epoch": 1, "val/acc1": 99.0},  # stopped early
               "a-c2": {"epoch": 3, "val/acc1": 95.0}, "a-c3": {"epoch": 3, "val/acc1": 95.0},  # tie: earlier
               "b-c0": {}, "b-c1": {"epoch": 2, "val/acc1": 50.0}}  # b-c0 errored before reporting
    chosen = choose_from(trials, results, TuningConfig(trials=4))
    assert chosen["a"] == {"trial": "a-c2", "variant": "a", "tuned": {"optim.lr": 0.2}, "metric": "val/acc1",
                           "score": 95.0, "epochs_reached": 3, "trials": 4, "epochs": 10}
    assert chosen["b"]["trial"] == "b-c1" and chosen["b"]["epochs"] == 2
    low = choose_from(trials, {**results, "a-c0": {"epoch": 3, "val/loss": 0.1, "val/acc1": 90.0},
                               "a-c2": {"epoch": 3, "val/loss": 0.3}, "a-c3": {"epoch": 3, "val/loss": 0.2},
                               "b-c1": {"epoch": 2, "val/loss": 1.0}},
                      TuningConfig(trials=4, metric="val/loss", mode="min"))
    assert low["a"]["trial"] == "a-c0"
    with pytest.raises(SweepError, match="cell b: none of its 2 tuning trials reported val/acc1"):
        choose_from(trials, {**results, "b-c1": {}}, TuningConfig(trials=4))


def test_asha_compares_a_trial_only_with_its_own_cell():
    """A weak cell's trials are not stopped because a strong cell reached the rung first (one global ASHA
    would stop them); within the cell the worse trial is."""
    from ray.tune.schedulers import AsyncHyperBandScheduler

    cells = {"strong-c0": "strong", "strong-c1": "strong", "weak-c0": "weak", "weak-c1": "weak", "weak-c2": "weak"}
    trials = {name: SimpleNamespace(trial_id=name, config={"trial": name}) for name in cells}
    per_cell = CellASHA(cells, max_t=9, grace_period=1, reduction_factor=3)
    overall = AsyncHyperBandScheduler(max_t=9, grace_period=1, reduction_factor=3)
    decisions = {}
    for scheduler in (per_cell, overall):
        scheduler.set_search_properties("val/acc1", "max")
        for trial in trials.values():
            scheduler.on_trial_add(None, trial)
        decisions[scheduler] = [scheduler.on_trial_result(None, trials[name], {"training_iteration": 1,
                                                                              "val/acc1": accuracy})
                                for name, accuracy in [("strong-c0", 99.0), ("strong-c1", 99.5), ("weak-c0", 50.0),
                                                       ("weak-c1", 60.0), ("weak-c2", 40.0)]]
    assert decisions[per_cell] == ["CONTINUE", "CONTINUE", "CONTINUE", "CONTINUE", "STOP"]
    assert decisions[overall] == ["CONTINUE", "CONTINUE", "STOP", "STOP", "STOP"]
    assert set(per_cell.cells) == {"strong", "weak"}


# ------------------------------------------------------------------------------------------ a real one
@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A tuned sweep on digits, interrupted in its tuning stage (SIGINT once two trials finished), then
    resumed with `--resume` through both stages."""
    folder = tmp_path_factory.mktemp("tuned")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    write(folder / "base.yaml", {**BASE, "track": {**BASE["track"], "tracking_uri": uri}})
    spec = yaml.safe_load(open(_tuned(folder)))
    sweep = write(folder / "fair.yaml", {**spec, "max_concurrent": 1})
    with _sweep_process(folder, sweep, "--num-cpus", "2") as proc:
        _wait(proc, lambda: len(list(folder.glob("runs/sweeps/*/*/digits_fair/*/summary.json"))) >= 2)
        proc.send_signal(signal.SIGINT)
        interrupted = _ended(proc, 120), open(proc.log).read()
    with _sweep_process(folder, sweep, "--num-cpus", "2", "--resume") as proc:
        assert _ended(proc, 600) == 0, _tail(proc.log)
        resumed = open(proc.log).read()
    (root,) = (folder / "ray_results").glob("fair-*")
    return SimpleNamespace(folder=folder, uri=uri, root=root, sweep_id=root.name, interrupted=interrupted,
                           resumed=resumed)


def _wait(proc, condition, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            pytest.fail(f"harness sweep ended ({proc.returncode}) early:\n{_tail(proc.log)}")
        time.sleep(0.1)
    pytest.fail(f"condition not met within {timeout} s:\n{_tail(proc.log)}")


def _runs(uri: str, sweep_id: str) -> list:
    from harness.track import find_runs

    return find_runs(uri, "fair", {"sweep.id": sweep_id})


@pytest.mark.slow
def test_an_interrupted_tuned_sweep_resumes_through_both_stages(tuned):
    code, log = tuned.interrupted
    assert code == 130 and f"--resume {tuned.root}" in log, log[-3000:]
    assert "final stage" not in log  # cut off in the tuning stage
    runs = _runs(tuned.uri, tuned.sweep_id)
    assert not [r for r in runs if r.status == "RUNNING"]
    tune = [r for r in runs if r.tags.get("sweep.stage") == "tune" and r.tags.get("sweep.role") != "parent"]
    final = [r for r in runs if r.tags.get("sweep.stage") == "final" and r.tags.get("sweep.role") != "parent"]
    parents = {r.tags["sweep.stage"]: r for r in runs if r.tags.get("sweep.role") == "parent"}
    assert parents["tune"].status == parents["final"].status == "FINISHED"
    # every tuning trial has exactly one run that ended finished or stopped early by ASHA (an attempt cut off
    # before its first checkpoint left a run KILLED as interrupted, or FAILED as died, and the trial started anew)
    by_trial = {}
    for run in tune:
        by_trial.setdefault(run.tags["sweep.trial"], []).append(run)
    assert sorted(by_trial) == sorted(f"{c}-c{i}" for c in ("ann", "dsr-T=1", "dsr-T=2") for i in range(3))
    for name, trial_runs in by_trial.items():
        ended = [r for r in trial_runs if r.status == "FINISHED" or r.tags.get("sweep.stopped") == "early"]
        assert len(ended) == 1, (name, [(r.status, r.tags) for r in trial_runs])
        assert all((r.status, r.tags.get("sweep.stopped")) == ("KILLED", "interrupted") or
                   (r.status == "FAILED" and "died" in r.tags["sweep.error"]) for r in trial_runs if r not in ended)
        by_trial[name] = ended
    assert all(r.params["data.holdout"] == "0.2" and "val/acc1" in r.metrics for r in tune)
    assert not [k for r in tune for k in r.metrics if k.startswith("test/")]  # tuning never read the test split
    # the final stage: each cell's choice, on the whole training set, once per seed, tested
    selection = json.loads((tuned.root / "selection.json").read_text())
    assert set(selection) == {"ann", "dsr-T=1", "dsr-T=2"}
    assert sorted(r.tags["sweep.trial"] for r in final) == sorted(f"{c}-seed={s}" for c in selection for s in (0, 1))
    for run in final:
        choice = selection[run.tags["sweep.cell"]]
        assert run.status == "FINISHED" and run.params["data.holdout"] == "None"
        assert json.loads(run.tags["tuning.config"]) == choice["tuned"]
        assert run.tags["tuning.trials"] == "3" and run.tags["tuning.trial"] == choice["trial"]
        assert float(run.params["optim.lr"]) == pytest.approx(choice["tuned"]["optim.lr"])
        (chosen_run,) = by_trial[choice["trial"]]
        assert chosen_run.status == "FINISHED"  # chosen among the trials that ran every epoch
        assert float(run.tags["tuning.score"]) == pytest.approx(chosen_run.metrics["val/acc1"], abs=1e-4)
        assert "test/acc1" in run.metrics and run.tags["seed"] == run.params["seed"]
    assert "chose " in tuned.resumed and "final stage" in tuned.resumed


@pytest.mark.slow
def test_table_of_a_tuned_sweep_shows_the_final_runs_and_what_tuning_chose(tuned, monkeypatch, capsys):
    monkeypatch.chdir(tuned.folder)
    code, out, err = _cli(monkeypatch, capsys, "table", "--experiment", "fair", "--sweep", tuned.sweep_id,
                          "--tracking-uri", tuned.uri, "--rows", "variant,readout",
                          "--footnote", "ann=the ANN has no T")
    assert code == 0, err
    table, notes, _intro, tuning = out.split("\n\n", 3)
    assert table.splitlines()[0] == "| source | variant | readout | T=1 | T=2 |"
    assert "| measured | ann [a] | analog |" in table and "(n=2)" in table
    assert notes.strip() == "[a] the ANN has no T"
    assert "| dsr | analog | 1 |" in tuning and "| 3 |" in tuning and "| 0, 1 |" in tuning
    final = {r.tags["sweep.trial"]: r.metrics["test/acc1"] for r in _runs(tuned.uri, tuned.sweep_id)
             if r.tags.get("sweep.stage") == "final" and "sweep.trial" in r.tags}
    mean = (final["dsr-T=2-seed=0"] + final["dsr-T=2-seed=1"]) / 2
    assert f"| {mean:.2f} ± " in table.splitlines()[3]
    code, _out, err = _cli(monkeypatch, capsys, "table", "--experiment", "fair", "--sweep", tuned.sweep_id,
                           "--tracking-uri", tuned.uri, "--footnote", "qcfs=no such row")
    assert code == 2 and "--footnote qcfs=...: no row has the value 'qcfs'" in err
    code, out, err = _cli(monkeypatch, capsys, "plot", "--experiment", "fair", "--sweep", tuned.sweep_id,
                          "--tracking-uri", tuned.uri, "--series", "variant", "--curves", "--output", "c.png")
    assert code == 0 and (tuned.folder / "c.png").stat().st_size > 10_000, err


def test_the_committed_table_is_what_the_committed_store_gives(tmp_path):
    """results/tables/mnist5k_fair.md is `harness table` over the MLflow runs of its sweep id, kept (gzipped)
    in results/mlflow/: every measured row (footnote marks aside) and the tuning table come out the same."""
    import gzip
    import shutil
    from pathlib import Path

    from harness.report import comparison

    root = Path(__file__).resolve().parents[1]
    with gzip.open(root / "results" / "mlflow" / "mnist5k_fair.db.gz") as packed, open(tmp_path / "m.db", "wb") as db:
        shutil.copyfileobj(packed, db)
    made = comparison("mnist5k-fair", f"sqlite:///{tmp_path / 'm.db'}", ["variant", "readout"], "T", "test/acc1",
                      sweep="mnist5k_fair-20261203-191638")
    committed = (root / "results" / "tables" / "mnist5k_fair.md").read_text()
    rows = [line.replace(" [a]", "").replace(" [b]", "") for line in committed.splitlines() if line.startswith("|")]
    assert [line for line in made.splitlines() if line.startswith("|")] == rows
    assert "(n=3)" in rows[2] and len(rows) == 2 + 6 + 2 + 21  # 6 method rows; 21 cells in the tuning table
