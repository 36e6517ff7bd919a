"""`harness bench step`: training-step time and memory against T, per method, on one backbone.

For each method and T, a model is built exactly as `harness launch` builds it (`harness.methods.build`
on the `model` and `method` sections alone), then `warmup` + `steps` SGD steps run on a fixed random
batch. Reported per (method, T):
  - `ms_per_step`: median wall time of a step (CUDA-synchronised on a GPU);
  - `saved_mb`: megabytes of tensors autograd saves for backward in one forward, measured with
    `torch.autograd.graph.saved_tensors_hooks` (device-independent: DSR's stays O(1) in T per neuron,
    BPTT's grows with T);
  - `peak_mb`: CUDA peak allocated memory of a step (GPU only).
Ratios are read side by side from one run (the machine is shared and noisy). Results go to
`results/bench/step_<device>_<backbone>.json`.
"""

import json
import statistics
import time
from pathlib import Path

import torch

from harness import methods
from harness.recipe import ModelConfig, method_section


def build_model(backbone: str, method: str, T: int, num_classes: int, input_shape: tuple[int, ...]):
    section = method_section({"name": method} if method == "ann" else {"name": method, "T": T})
    return methods.build(ModelConfig(backbone=backbone), section, methods.DataInfo(num_classes, input_shape))


def saved_bytes(method_model, x: torch.Tensor, y: torch.Tensor) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        seen[id(t.untyped_storage())] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = method_model.forward_loss(x, y)
    del loss
    return sum(seen.values())


def measure(backbone: str, method: str, T: int, batch: int, num_classes: int, input_shape: tuple[int, ...],
            steps: int, warmup: int, device: torch.device, precision: str) -> dict:
    torch.manual_seed(0)
    built = build_model(backbone, method, T, num_classes, input_shape)
    model = built.model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, *input_shape, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
    cuda = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss, _ = built.forward_loss(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        saved = saved_bytes(built, x, y)
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    row = {"method": method, "T": T, "batch": batch, "ms_per_step": 1000 * statistics.median(times),
           "saved_mb": saved / 2**20, "img_per_s": batch / statistics.median(times)}
    if cuda:
        row["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def run_step_bench(backbone: str, method_names: list[str], time_steps: list[int], batch: int, num_classes: int,
                   input_shape: tuple[int, ...], steps: int, warmup: int, device: str, precision: str,
                   out_dir: Path, echo=print) -> dict:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    rows = []
    for method in method_names:
        for T in ([1] if method == "ann" else time_steps):
            row = measure(backbone, method, T, batch, num_classes, input_shape, steps, warmup, dev, precision)
            rows.append(row)
            peak = f"  peak {row['peak_mb']:8.1f} MB" if "peak_mb" in row else ""
            echo(f"{method:>5} T={T:<3} {row['ms_per_step']:9.2f} ms/step  {row['img_per_s']:9.1f} img/s  "
                 f"saved {row['saved_mb']:8.1f} MB{peak}")
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    result = {"backbone": backbone, "input_shape": list(input_shape), "num_classes": num_classes,
              "precision": precision, "device": device_name, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "rows": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"step_{dev.type}_{backbone}.json"
    path.write_text(json.dumps(result, indent=2))
    echo(f"wrote {path}")
    return result
