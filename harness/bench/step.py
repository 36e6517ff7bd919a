"""`harness bench step`: training-step time and memory against T, per method, on one backbone.

For each method and T, a model is built exactly as `harness launch` builds it (`harness.methods.build` on the
`model` and `method` sections alone), then `warmup` + `steps` SGD steps run on a fixed random batch. Methods:
`ann`, `dsr` (exact backward), `dsr_repr` (`method.backward: representation`), `dsr_repr_nocov` (the same with
`method.time_covariance: false`), `sg`, `qcfs`. The ANN always runs, as the floor: at batch B (its `T=1` row)
and, for every other T, at batch T*B (`T=4` row: batch 4B), the samples every layer of the SNN sees. With
`peer="spikingjelly"`, `dsr` and `sg` (those of them among the methods) run a second time with SpikingJelly's
neurons in place of ours (`harness.bench.peer`), as rows `sj_dsr` and `sj_sg`.
Reported per (method, T):
  - `ms_per_step`: median wall time of a step (CUDA-synchronised on a GPU); `img_per_s`: batch / that;
  - `saved_mb`: MiB of tensors autograd saves for backward in one forward, measured with
    `torch.autograd.graph.saved_tensors_hooks` (device-independent: DSR's stays O(1) in T per neuron,
    BPTT's grows with T, the representation backward's does not depend on T at all);
  - `peak_mb`: peak memory of the warm-up and timed steps over the memory held once the model and the batch
    are built and one sample has been through the model (eval mode, no graph: first-call set-up stays out)
    (`harness.bench.memory`): CUDA allocated memory; on the CPU the resident set size, each configuration then
    running in a process of its own (`python -m harness.bench.worker`);
  - `time_vs_ann_TB`: `ms_per_step` over the ANN's at batch T*B; `saved_vs_ann_B` and `peak_vs_ann_B`:
    `saved_mb` and `peak_mb` over the ANN's at batch B; on every spiking row, ours and the peer's.
Ratios are read side by side from one run (the machine is shared and noisy). Results go to
`<out_dir>/step_<device>_<backbone>.{json,csv,png}`: the whole result, its rows, and a plot of ms/step and of
peak and saved memory against T per method.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from harness import methods
from harness.bench import output, peer
from harness.bench.memory import PeakMemory
from harness.errors import HarnessError
from harness.recipe import ModelConfig, method_section
from harness.snn import kernels

# bench method name -> the recipe's method section (T added for the spiking ones)
BENCH_METHODS = {"ann": {"name": "ann"}, "dsr": {"name": "dsr"},
                 "dsr_repr": {"name": "dsr", "backward": "representation"},
                 "dsr_repr_nocov": {"name": "dsr", "backward": "representation", "time_covariance": False},
                 "sg": {"name": "sg"}, "qcfs": {"name": "qcfs"}}
PEER_METHODS = ("dsr", "sg")  # the methods a peer has neurons for
PEER_PREFIX = {"spikingjelly": "sj_"}

COLUMNS: list[output.Column] = [
    ("method", "method", "s"), ("T", "T", "d"), ("batch", "batch", "d"), ("ms_per_step", "ms/step", ".2f"),
    ("img_per_s", "img/s", ".1f"), ("saved_mb", "saved MB", ".2f"), ("peak_mb", "peak MB", ".1f"),
    ("time_vs_ann_TB", "time / ANN at T*B", ".2f"), ("saved_vs_ann_B", "saved / ANN at B", ".2f"),
    ("peak_vs_ann_B", "peak / ANN at B", ".2f"),
]


@dataclass(frozen=True)
class StepConfig:
    """One (method, T) measurement; `batch` is the samples per step (T*B for the ANN's T rows)."""

    backbone: str
    method: str
    T: int
    batch: int
    num_classes: int
    input_shape: tuple[int, ...]
    steps: int
    warmup: int
    device: str
    precision: str
    peer: str | None = None
    threads: int | None = None

    @property
    def label(self) -> str:
        return PEER_PREFIX[self.peer] + self.method if self.peer else self.method


def build_model(backbone: str, method: str, T: int, num_classes: int, input_shape: tuple[int, ...]):
    section = dict(BENCH_METHODS[method])
    if section["name"] != "ann":
        section["T"] = T
    return methods.build(ModelConfig(backbone=backbone), method_section(section),
                         methods.DataInfo(num_classes, input_shape))


def saved_bytes(method_model, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves in one training forward, after one untracked forward (a method's
    first step may do one-time work: the representation backward traces its batch norms' feeding layers)."""
    method_model.forward_loss(x, y)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        seen[id(t.untyped_storage())] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = method_model.forward_loss(x, y)
    del loss
    return sum(seen.values())


def measure(config: StepConfig) -> dict:
    """Time `config`'s steps in this process: its row (module docstring)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    torch.manual_seed(0)
    built = build_model(config.backbone, config.method, config.T, config.num_classes, config.input_shape)
    if config.peer:
        peer.replace_neurons(built.model)
    model = built.model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(config.batch, *config.input_shape, device=device)
    y = torch.randint(0, config.num_classes, (config.batch,), device=device)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[config.precision]
    cuda = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss, _ = built.forward_loss(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    kernels.check_selected(device.type)  # loads (or builds) the fused neuron kernel now, not inside the peak
    model.eval()  # one-time set-up of a first forward (lazy imports, kernels) stays out of the peak as well
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        model(x[:1])
    model.train()
    memory = PeakMemory(device)
    for _ in range(config.warmup):
        step()
    times = []
    for _ in range(config.steps):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = memory.peak_mb()
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        saved = saved_bytes(built, x, y)
    seconds = statistics.median(times)
    return {"method": config.label, "T": config.T, "batch": config.batch, "ms_per_step": 1000 * seconds,
            "img_per_s": config.batch / seconds, "saved_mb": saved / 2**20, "peak_mb": peak}


def measure_in_subprocess(config: StepConfig) -> dict:
    """`measure(config)` in a fresh Python process (`harness.bench.worker`), so that its peak resident set
    size is its own. A `HarnessError` there is raised here with its message."""
    done = subprocess.run([sys.executable, "-m", "harness.bench.worker", json.dumps(asdict(config))],
                          capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    answer = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    if "error" in answer:
        raise HarnessError(answer["error"])
    if done.returncode != 0 or "ms_per_step" not in answer:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"bench worker for {config.label} T={config.T} exited {done.returncode}: {last}")
    return answer


def plan(method_names: list[str], time_steps: list[int], batch: int, peer_name: str | None,
         **common) -> list[StepConfig]:
    """The configurations to run, in table order: the ANN first, each peer row after its method's."""
    configs = []
    for method in ["ann", *[m for m in method_names if m != "ann"]]:
        for T in (sorted({1, *time_steps}) if method == "ann" else time_steps):
            configs.append(StepConfig(method=method, T=T, batch=batch * T if method == "ann" else batch, **common))
        if peer_name and method in PEER_METHODS:
            configs += [StepConfig(method=method, T=T, batch=batch, peer=peer_name, **common) for T in time_steps]
    return configs


def resolve_device(choice: str) -> torch.device:
    """`auto` (CUDA where torch sees it, else the CPU), `cpu` or `cuda`."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def run_step_bench(backbone: str, method_names: list[str], time_steps: list[int], batch: int, num_classes: int,
                   input_shape: tuple[int, ...], steps: int, warmup: int, device: str, precision: str,
                   out_dir: Path, echo=print, peer_name: str | None = None) -> dict:
    """Run the step bench (module docstring); `device`: auto, cpu or cuda; `peer_name`: None or one of
    `peer.PEERS`. Writes the JSON, CSV and PNG, echoes progress and the table; returns the result."""
    dev = resolve_device(device)
    if peer_name:
        peer.require(peer_name)
        if not set(PEER_METHODS) & set(method_names):
            raise peer.PeerError(f"--peer: {peer_name} has neurons for {' and '.join(PEER_METHODS)}; "
                                 f"name one of them in --methods")
    configs = plan(method_names, time_steps, batch, peer_name, backbone=backbone, num_classes=num_classes,
                   input_shape=tuple(input_shape), steps=steps, warmup=warmup, device=dev.type,
                   precision=precision, threads=torch.get_num_threads())
    rows = []
    for config in configs:
        row = measure(config) if dev.type == "cuda" else measure_in_subprocess(config)
        rows.append(row)
        peak = "" if row["peak_mb"] is None else f"  peak {row['peak_mb']:8.1f} MB"
        echo(f"{row['method']:>14} T={row['T']:<3} batch {row['batch']:<4} {row['ms_per_step']:9.2f} ms/step  "
             f"{row['img_per_s']:9.1f} img/s  saved {row['saved_mb']:8.1f} MB{peak}")
    add_ratios(rows)
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    result = {"backbone": backbone, "input_shape": list(input_shape), "num_classes": num_classes, "batch": batch,
              "precision": precision, "device": device_name, "torch": torch.__version__, "peer": peer_name,
              "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0], "steps": steps,
              "warmup": warmup, "rows": rows}
    paths = output.write_all(out_dir / f"step_{dev.type}_{backbone}", result, COLUMNS, plot)
    echo(output.table(f"bench step: {backbone}, batch B={batch}, {precision}, {device_name}", COLUMNS, rows))
    echo("wrote " + ", ".join(str(p) for p in paths))
    return result


def add_ratios(rows: list[dict]) -> None:
    """Add `time_vs_ann_TB`, `saved_vs_ann_B` and `peak_vs_ann_B` to every spiking row that has its ANN rows."""
    ann = {row["T"]: row for row in rows if row["method"] == "ann"}
    for row in rows:
        if row["method"] == "ann" or row["T"] not in ann or 1 not in ann:
            continue
        row["time_vs_ann_TB"] = row["ms_per_step"] / ann[row["T"]]["ms_per_step"]
        row["saved_vs_ann_B"] = row["saved_mb"] / ann[1]["saved_mb"]
        if row.get("peak_mb") is not None and (ann[1].get("peak_mb") or 0) > 0:
            row["peak_vs_ann_B"] = row["peak_mb"] / ann[1]["peak_mb"]


def plot(result: dict, path: Path) -> None:
    """ms/step against T per method, the ANN at batch T*B as the floor; peak (solid) and saved (dashed) MiB."""
    fig, (time_ax, memory_ax) = output.figure(2)
    labels = list(dict.fromkeys(row["method"] for row in result["rows"]))
    colors = {label: f"C{i}" for i, label in enumerate(labels)}
    for label in labels:
        rows = sorted((r for r in result["rows"] if r["method"] == label), key=lambda r: r["T"])
        Ts = [r["T"] for r in rows]
        ann = label == "ann"
        time_ax.plot(Ts, [r["ms_per_step"] for r in rows], marker="o", color="black" if ann else colors[label],
                     linestyle="--" if ann else "-", label="ANN at batch T*B (floor)" if ann else label)
        peaks = [(r["T"], r["peak_mb"]) for r in rows if r.get("peak_mb") is not None]
        if peaks:
            memory_ax.plot(*zip(*peaks, strict=True), marker="o", color=colors[label], label=f"{label} peak")
        memory_ax.plot(Ts, [r["saved_mb"] for r in rows], marker="s", linestyle="--", color=colors[label],
                       label=f"{label} saved")
    for ax, ylabel in ((time_ax, "ms / training step"), (memory_ax, "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("T (the ANN: batch T*B)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    time_ax.set_title(f"{result['backbone']}, B={result['batch']}, {result['precision']}, {result['device']}")
    memory_ax.set_title("peak memory of a step (solid), autograd saved (dashed)")
    fig.savefig(path, dpi=120)
