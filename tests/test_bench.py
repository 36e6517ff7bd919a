"""`harness bench step` and `harness bench neuron`: the files and rows they write, the CPU peak memory of a
configuration in a process of its own, SpikingJelly's neurons as the peer (the same spikes and gradients as
ours), and bad input as one line with exit code 2."""

import csv
import json
import sys

import pytest
import torch
from click.testing import CliRunner

from harness.bench import add_ratios, build_model, peer
from harness.bench.neuron import COLUMNS as NEURON_COLUMNS
from harness.bench.step import COLUMNS as STEP_COLUMNS
from harness.bench.step import StepConfig, measure_in_subprocess
from harness.cli import main, run
from harness.snn import DSRIF, DSRLIF, SGIF, SGLIF, SpikingNeuron, kernels

needs_spikingjelly = pytest.mark.skipif(peer.import_error() is not None,
                                        reason=f"spikingjelly does not import ({peer.import_error()}); "
                                               f"install it: {peer.INSTALL}")


def bench(*argv: str) -> str:
    done = CliRunner().invoke(main, ["bench", *argv], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    return done.output


def read_csv(path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def assert_png(path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------- bench step
STEP_TINY = ["--backbone", "snn_convnet", "--input", "1,8,8", "--T", "2", "--batch", "2", "--steps", "1",
             "--warmup", "0", "--device", "cpu"]


@pytest.mark.slow
def test_step_bench_writes_json_csv_png_with_ratios_and_cpu_peak_memory(tmp_path):
    output = bench("step", *STEP_TINY, "--methods", "dsr", "--out-dir", str(tmp_path))
    stem = tmp_path / "step_cpu_snn_convnet"
    rows = read_csv(stem.with_suffix(".csv"))
    assert list(rows[0]) == [key for key, _, _ in STEP_COLUMNS]
    assert [(r["method"], r["T"], r["batch"]) for r in rows] == [("ann", "1", "2"), ("ann", "2", "4"),
                                                                ("dsr", "2", "2")]  # the ANN always runs
    saved = json.loads(stem.with_suffix(".json").read_text())
    dsr = saved["rows"][2]
    assert dsr["time_vs_ann_TB"] == pytest.approx(dsr["ms_per_step"] / saved["rows"][1]["ms_per_step"])
    assert all(r["peak_mb"] > 0 for r in saved["rows"]) and "peak_vs_ann_B" in dsr
    assert_png(stem.with_suffix(".png"))
    assert "time / ANN at T*B" in output and "wrote " in output


@pytest.mark.slow
@needs_spikingjelly
def test_step_bench_peer_rows_get_the_same_ratios(tmp_path):
    bench("step", *STEP_TINY, "--methods", "ann,dsr,sg", "--peer", "spikingjelly", "--out-dir", str(tmp_path))
    rows = json.loads((tmp_path / "step_cpu_snn_convnet.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["ann", "ann", "dsr", "sj_dsr", "sg", "sj_sg"]
    for row in rows[2:]:
        assert {"time_vs_ann_TB", "saved_vs_ann_B", "peak_vs_ann_B"} <= set(row)
    assert {r["method"] for r in read_csv(tmp_path / "step_cpu_snn_convnet.csv")} >= {"sj_dsr", "sj_sg"}


@pytest.mark.slow
def test_cpu_peak_memory_is_positive_and_grows_with_the_batch():
    config = dict(backbone="snn_convnet", method="dsr", T=4, num_classes=10, input_shape=(1, 28, 28), steps=1,
                  warmup=1, device="cpu", precision="fp32")
    small, large = (measure_in_subprocess(StepConfig(batch=batch, **config)) for batch in (4, 64))
    assert 0 < small["peak_mb"] < large["peak_mb"]
    assert large["peak_mb"] > small["peak_mb"] + 0.5 * (large["saved_mb"] - small["saved_mb"])


def test_ratios_cover_every_spiking_row_ours_and_the_peers():
    rows = [{"method": "ann", "T": 1, "ms_per_step": 1.0, "saved_mb": 1.0, "peak_mb": 2.0},
            {"method": "ann", "T": 4, "ms_per_step": 2.0, "saved_mb": 4.0, "peak_mb": 8.0},
            {"method": "dsr", "T": 4, "ms_per_step": 6.0, "saved_mb": 3.0, "peak_mb": 5.0},
            {"method": "sj_dsr", "T": 4, "ms_per_step": 8.0, "saved_mb": 5.0, "peak_mb": None}]
    add_ratios(rows)
    assert (rows[2]["time_vs_ann_TB"], rows[2]["saved_vs_ann_B"], rows[2]["peak_vs_ann_B"]) == (3.0, 3.0, 2.5)
    assert (rows[3]["time_vs_ann_TB"], rows[3]["saved_vs_ann_B"]) == (4.0, 5.0) and "peak_vs_ann_B" not in rows[3]


# --------------------------------------------------------------------------------------------- bench neuron
NEURON_TINY = ["--shape", "2,4,4", "--T", "2", "--batch", "3", "--steps", "1", "--warmup", "0", "--device", "cpu"]


def test_neuron_bench_writes_rows_per_pass_and_implementation(tmp_path):
    output = bench("neuron", *NEURON_TINY, "--neuron", "if,lif", "--precision", "fp32,bf16",
                   "--out-dir", str(tmp_path))
    stem = tmp_path / "neuron_cpu_2x4x4_B3"
    rows = read_csv(stem.with_suffix(".csv"))
    assert list(rows[0]) == [key for key, _, _ in NEURON_COLUMNS]
    impls = ["plain", "fused"] if kernels.fused_status("cpu")[0] else ["plain"]
    expected = [(neuron, precision, pass_name, impl) for neuron in ("if", "lif") for precision in ("fp32", "bf16")
                for pass_name, impl in [("clone", "clone")] + [(p, i) for p in ("forward", "forward+backward")
                                                               for i in impls]]
    assert [(r["neuron"], r["precision"], r["pass"], r["impl"]) for r in rows] == expected
    n = 3 * 2 * 4 * 4
    saved = json.loads(stem.with_suffix(".json").read_text())["rows"]
    fp32 = {(r["neuron"], r["pass"], r["impl"]): r for r in saved if r["precision"] == "fp32"}
    assert fp32["if", "forward", "plain"]["mb_moved"] == pytest.approx((2 * 2 * n * 4 + 4 * n) / 1e6)
    assert fp32["if", "forward+backward", "plain"]["mb_moved"] == pytest.approx((4 * 2 * n * 4 + 4 * n) / 1e6)
    assert fp32["if", "clone", "clone"]["mb_moved"] == pytest.approx(2 * 2 * n * 4 / 1e6)
    bf16 = next(r for r in saved if r["precision"] == "bf16" and r["impl"] == "clone")
    assert bf16["mb_moved"] == pytest.approx(2 * 2 * n * 2 / 1e6)
    plain = fp32["lif", "forward", "plain"]
    assert plain["vs_clone"] == pytest.approx(plain["ms"] / fp32["lif", "clone", "clone"]["ms"])
    both = fp32["lif", "forward+backward", "plain"]  # against the same single clone
    assert both["vs_clone"] == pytest.approx(both["ms"] / fp32["lif", "clone", "clone"]["ms"])
    assert plain["gb_per_s"] == pytest.approx(plain["mb_moved"] / plain["ms"])
    assert_png(stem.with_suffix(".png"))
    assert "GB/s" in output


@needs_spikingjelly
def test_neuron_bench_peer_row(tmp_path):
    bench("neuron", *NEURON_TINY, "--neuron", "lif", "--peer", "spikingjelly", "--out-dir", str(tmp_path))
    rows = read_csv(tmp_path / "neuron_cpu_2x4x4_B3.csv")
    assert [r["impl"] for r in rows if r["pass"] == "forward"][-1] == "sj"
    assert [r["impl"] for r in rows if r["pass"] == "forward+backward"][-1] == "sj"


# ----------------------------------------------------------------------------------------------- the peer
@needs_spikingjelly
@pytest.mark.parametrize("neuron", [
    DSRIF(4), DSRLIF(4), DSRLIF(4, tau=2.0, dt=0.1), SGIF(4), SGIF(4, reset="soft", surrogate="arctan", slope=3.0),
    SGLIF(4), SGLIF(4, leak=0.8, detach_reset=True, surrogate="rectangular", width=0.5)],
    ids=["dsr_if", "dsr_lif", "dsr_lif_tau2", "sg_if", "sg_if_soft_arctan", "sg_lif", "sg_lif_rect_detach"])
def test_spikingjelly_twin_spikes_and_backpropagates_as_ours(neuron):
    twin = peer.twin(neuron)
    scale = neuron.vth.item() / getattr(neuron, "dt", 1.0) if isinstance(neuron, (DSRIF, DSRLIF)) else neuron.vth
    x = (torch.randn(4 * 3, 2, 5, 5, generator=torch.Generator().manual_seed(0)) * scale).requires_grad_()
    g = torch.randn_like(x)
    ours_out = neuron(x)
    (ours_grad,) = torch.autograd.grad(ours_out, x, g)
    for _ in range(2):  # stateful in SpikingJelly: the wrapper resets it at every call
        theirs_out = twin(x)
        (theirs_grad,) = torch.autograd.grad(theirs_out, x, g)
        torch.testing.assert_close(theirs_out, ours_out)
        torch.testing.assert_close(theirs_grad, ours_grad)
    assert ours_out.abs().sum() > 0


@needs_spikingjelly
@pytest.mark.parametrize("method", ["dsr", "sg"])
def test_replaced_neurons_give_our_model_s_loss(method):
    torch.manual_seed(0)
    ours = build_model("snn_convnet", method, 2, 10, (1, 8, 8))
    torch.manual_seed(0)
    theirs = build_model("snn_convnet", method, 2, 10, (1, 8, 8))
    count = sum(isinstance(m, SpikingNeuron) for m in theirs.model.body.modules())
    assert peer.replace_neurons(theirs.model.body) == count > 0
    assert not any(isinstance(m, SpikingNeuron) for m in theirs.model.body.modules())
    x, y = torch.randn(4, 1, 8, 8) * 3, torch.randint(0, 10, (4,))
    torch.testing.assert_close(theirs.forward_loss(x, y)[0], ours.forward_loss(x, y)[0])


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("argv, named", [
    (["neuron", "--shape", "3,x"], "--shape"), (["neuron", "--T", "0"], "--T"), (["step", "--T", "0"], "--T"),
    (["step", "--T", "2,-1"], "--T"), (["step", "--peer", "brian2"], "--peer"), (["neuron", "--peer", "x"], "--peer"),
    (["neuron", "--neuron", "izhikevich"], "--neuron"), (["neuron", "--precision", "fp8"], "--precision"),
    (["step", "--methods", "ann", "--peer", "spikingjelly"], "--peer"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_input_exits_2_with_one_line_naming_the_option(monkeypatch, capsys, tmp_path, argv, named):
    monkeypatch.setattr(sys, "argv", ["harness", "bench", *argv, "--out-dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        run()
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert named in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_missing_peer_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setattr(peer, "import_error", lambda: "ModuleNotFoundError: No module named 'spikingjelly'")
    monkeypatch.setattr(sys, "argv", ["harness", "bench", "neuron", "--peer", "spikingjelly"])
    with pytest.raises(SystemExit) as exit_info:
        run()
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert line.startswith("error: --peer: spikingjelly does not import (ModuleNotFoundError") and "pip install" in line
