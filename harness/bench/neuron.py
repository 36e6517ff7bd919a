"""`harness bench neuron`: one DSR layer's time loop, the plain loop against the fused kernel, against a copy.

For each neuron kind (`DSRIF(T)` / `DSRLIF(T)`, their defaults), T and precision, the layer runs on a random
input `x` of shape `[T*B, *shape]` in the precision's dtype (scaled by the layer's output amplitude, V for IF
and V/dt for LIF, so that it fires), in two passes:
  - `forward`: `layer(x)` without autograd;
  - `forward+backward`: `layer(x)` then its backward from a fixed upstream gradient `g`;
both against one `x.clone()` (one read and one write of the input, which a fused forward must at least do;
forward+backward must do it twice: its floor is 2x).
Implementations: `plain` and `fused` (`harness.snn.kernels.using`; `fused` only where `fused_status` says it
runs), and with `peer="spikingjelly"` SpikingJelly's `DSRIFNode` / `DSRLIFNode` (`sj`, `harness.bench.peer`).
Per row: `ms` (median of `steps` calls after `warmup`: CUDA events on a GPU, `perf_counter` on the CPU),
`vs_clone` (over one clone of the input), `mb_moved` and `gb_per_s` (10^6 and 10^9 bytes). With
N = B * prod(shape) and e the element size of the input dtype, the bytes a pass must move are
  forward:  T*N*e read (input) + T*N*e written (spikes) + 4*N written (the float32 representation);
  backward: T*N*e read (upstream gradient) + T*N*e written (input gradient);
  clone:    2*T*N*e (each);
one count per pass for every implementation (the layer's least traffic), so `gb_per_s` puts them on one
scale (SpikingJelly's node moves more: it saves its input and writes float32 spikes). On the CPU glibc's
allocator is told to keep freed memory (`memory.keep_freed_memory`), as PyTorch's CUDA caching allocator does:
otherwise every tensor above 32 MiB is a fresh mapping whose page faults cost more than the copy itself, and
whether a size crosses that line, not the kernel, would decide the ratios. Results go to
`<out_dir>/neuron_<device>_<C>x<H>x<W>_B<B>.{json,csv,png}` (the PNG: each row's time over its floor).
"""

import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from harness.bench import output, peer
from harness.bench.memory import keep_freed_memory
from harness.bench.step import resolve_device
from harness.snn import DSRIF, DSRLIF, kernels

NEURONS = {"if": DSRIF, "lif": DSRLIF}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PASSES = ("forward", "forward+backward")

COLUMNS: list[output.Column] = [
    ("neuron", "neuron", "s"), ("T", "T", "d"), ("precision", "precision", "s"), ("pass", "pass", "s"),
    ("impl", "impl", "s"), ("ms", "ms", ".3f"), ("vs_clone", "x clone", ".2f"), ("mb_moved", "MB moved", ".2f"),
    ("gb_per_s", "GB/s", ".1f"),
]


def median_ms(fn: Callable[[], object], steps: int, warmup: int, device: torch.device) -> float:
    """Median milliseconds of `fn()` over `steps` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(steps):
            start = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def bytes_moved(pass_name: str, T: int, n: int, element: int) -> int:
    """Least bytes a layer's `pass_name` moves (module docstring)."""
    forward = 2 * T * n * element + 4 * n
    return forward if pass_name == "forward" else forward + 2 * T * n * element


def _calls(layer, x: torch.Tensor, g: torch.Tensor, impl: str | None) -> dict[str, Callable[[], object]]:
    """`{pass: fn}` for `layer` under kernel choice `impl` (None: the peer, no choice to make)."""
    leaf = x.detach().requires_grad_()
    choice = (lambda: kernels.using(impl)) if impl else contextlib.nullcontext

    def forward():
        with torch.no_grad(), choice():
            return layer(x)

    def forward_backward():
        leaf.grad = None
        with choice():
            layer(leaf).backward(g)

    return {"forward": forward, "forward+backward": forward_backward}


def measure_case(kind: str, T: int, precision: str, shape: tuple[int, ...], batch: int, device: torch.device,
                 steps: int, warmup: int, impls: list[str], peer_name: str | None) -> list[dict]:
    """The rows of one (neuron, T, precision): per pass, the clone floor then each implementation."""
    torch.manual_seed(0)
    layer = NEURONS[kind](T).to(device)
    dtype = DTYPES[precision]
    scale = layer.vth.item() / getattr(layer, "dt", 1.0)
    x = (torch.randn(T * batch, *shape, device=device) * scale).to(dtype)
    g = torch.randn_like(x)
    layers = {impl: (layer, impl) for impl in impls}
    if peer_name:
        layers["sj"] = (peer.twin(layer).to(device), None)
    n, element = batch * math.prod(shape), x.element_size()
    clone_ms = median_ms(lambda: x.clone(), steps, warmup, device)
    clone_bytes = 2 * T * n * element
    rows = [{"neuron": kind, "T": T, "precision": precision, "pass": "clone", "impl": "clone", "ms": clone_ms,
             "vs_clone": 1.0, "mb_moved": clone_bytes / 1e6, "gb_per_s": clone_bytes / clone_ms / 1e6}]
    for pass_name in PASSES:
        moved = bytes_moved(pass_name, T, n, element)
        for name, (module, impl) in layers.items():
            ms = median_ms(_calls(module, x, g, impl)[pass_name], steps, warmup, device)
            rows.append({"neuron": kind, "T": T, "precision": precision, "pass": pass_name, "impl": name, "ms": ms,
                         "vs_clone": ms / clone_ms, "mb_moved": moved / 1e6, "gb_per_s": moved / ms / 1e6})
    return rows


def run_neuron_bench(shape: tuple[int, ...], time_steps: list[int], batch: int, neurons: list[str],
                     precisions: list[str], device: str, steps: int, warmup: int, out_dir: Path, echo=print,
                     peer_name: str | None = None) -> dict:
    """Run the neuron bench (module docstring); `device`: auto, cpu or cuda. Writes the JSON, CSV and PNG, echoes
    the table; returns the result."""
    dev = resolve_device(device)
    if peer_name:
        peer.require(peer_name)
    if dev.type == "cpu":
        keep_freed_memory()
    fused, why_not = kernels.fused_status(dev.type)
    impls = ["plain", "fused"] if fused else ["plain"]
    if not fused:
        echo(f"fused kernel: not available on {dev.type} ({why_not}); timing the plain loop only")
    rows = []
    for kind in neurons:
        for T in time_steps:
            for precision in precisions:
                rows += measure_case(kind, T, precision, tuple(shape), batch, dev, steps, warmup, impls, peer_name)
                echo(f"{kind} T={T} {precision}: done")
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    result = {"shape": list(shape), "batch": batch, "device": device_name, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0], "steps": steps,
              "warmup": warmup, "peer": peer_name, "fused": fused or why_not, "rows": rows}
    shape_text = "x".join(map(str, shape))
    paths = output.write_all(out_dir / f"neuron_{dev.type}_{shape_text}_B{batch}", result, COLUMNS, plot)
    echo(output.table(f"bench neuron: [T*{batch}, {shape_text}], {device_name}", COLUMNS, rows))
    echo("wrote " + ", ".join(str(p) for p in paths))
    return result


def plot(result: dict, path: Path) -> None:
    """Per pass, a bar per implementation and (neuron, T, precision): its time over one clone's."""
    fig, axes = output.figure(len(PASSES))
    for ax, pass_name in zip(axes, PASSES, strict=True):
        rows = [r for r in result["rows"] if r["pass"] == pass_name]
        cases = list(dict.fromkeys((r["neuron"], r["T"], r["precision"]) for r in rows))
        impls = list(dict.fromkeys(r["impl"] for r in rows))
        width = 0.8 / max(len(impls), 1)
        for i, impl in enumerate(impls):
            ratio = {(r["neuron"], r["T"], r["precision"]): r["vs_clone"] for r in rows if r["impl"] == impl}
            ax.bar([c + i * width for c in range(len(cases))], [ratio.get(case, 0.0) for case in cases], width,
                   label=impl)
        ax.axhline(1.0 if pass_name == "forward" else 2.0, color="black", linestyle="--", linewidth=1,
                   label="floor: one clone" if pass_name == "forward" else "floor: two clones")
        ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))],
                      [f"{k} T={T}\n{p}" for k, T, p in cases], fontsize="small")
        ax.set_ylabel("time over one clone of the input")
        ax.set_title(f"{pass_name}, [T*{result['batch']}, {'x'.join(map(str, result['shape']))}], "
                     f"{result['device']}")
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
