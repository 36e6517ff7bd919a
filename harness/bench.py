"""`harness bench step`: training-step time and memory against T, per method, on one backbone; and
`harness bench backward`: how far DSR's representation-space backward is from the exact one, per parameter.

Step bench. For each method and T, a model is built exactly as `harness launch` builds it
(`harness.methods.build` on the `model` and `method` sections alone), then `warmup` + `steps` SGD steps run
on a fixed random batch. Methods: `ann`, `dsr` (exact backward), `dsr_repr` (`method.backward:
representation`), `dsr_repr_nocov` (the same with `method.time_covariance: false`), `sg`. The ANN runs at
batch B (its `T=1` row) and, for every other T, at batch T*B (`T=4` row: batch 4B), the samples every layer
of the SNN sees. Reported per (method, T):
  - `ms_per_step`: median wall time of a step (CUDA-synchronised on a GPU);
  - `saved_mb`: megabytes of tensors autograd saves for backward in one forward, measured with
    `torch.autograd.graph.saved_tensors_hooks` (device-independent: DSR's stays O(1) in T per neuron,
    BPTT's grows with T, the representation backward's does not depend on T at all);
  - `peak_mb`: CUDA peak allocated memory of a step (GPU only);
  - `time_vs_ann_TB`: `ms_per_step` over the ANN's at batch T*B; `saved_vs_ann_B`: `saved_mb` over the
    ANN's at batch B (when `ann` is among the methods).
Ratios are read side by side from one run (the machine is shared and noisy). Results go to
`results/bench/step_<device>_<backbone>.json`.

Backward bench (`gradient_agreement`). For a DSR recipe, one training batch of its data, the model built
twice with the same weights (fresh, or `--weights` from a checkpoint), one backward in each mode in
training mode: per parameter, the cosine similarity of the representation gradient to the exact one and
their relative difference `|g_repr - g_exact| / |g_exact|`. Parameters whose exact gradient is
structurally zero (a bias followed by batch norm: norm below 1e-6 of the largest) are listed apart.
Results go to `results/bench/backward_<recipe name>_<label>.json`.
"""

import json
import statistics
import time
from pathlib import Path

import torch

from harness import methods
from harness.recipe import ModelConfig, method_section

# bench method name -> the recipe's method section (T added for the spiking ones)
BENCH_METHODS = {"ann": {"name": "ann"}, "dsr": {"name": "dsr"},
                 "dsr_repr": {"name": "dsr", "backward": "representation"},
                 "dsr_repr_nocov": {"name": "dsr", "backward": "representation", "time_covariance": False},
                 "sg": {"name": "sg"}, "qcfs": {"name": "qcfs"}}


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
        for T in (sorted({1, *time_steps}) if method == "ann" else time_steps):
            # the ANN's row at T is the ANN at batch T*B
            samples = batch * T if method == "ann" else batch
            row = measure(backbone, method, T, samples, num_classes, input_shape, steps, warmup, dev, precision)
            rows.append(row)
            peak = f"  peak {row['peak_mb']:8.1f} MB" if "peak_mb" in row else ""
            echo(f"{method:>14} T={T:<3} batch {samples:<4} {row['ms_per_step']:9.2f} ms/step  "
                 f"{row['img_per_s']:9.1f} img/s  saved {row['saved_mb']:8.1f} MB{peak}")
    add_ratios(rows)
    for row in rows:
        if "time_vs_ann_TB" in row:
            echo(f"{row['method']:>14} T={row['T']:<3} time {row['time_vs_ann_TB']:.2f}x the ANN at batch T*B, "
                 f"saved memory {row['saved_vs_ann_B']:.2f}x the ANN at batch B")
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    result = {"backbone": backbone, "input_shape": list(input_shape), "num_classes": num_classes,
              "precision": precision, "device": device_name, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "rows": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"step_{dev.type}_{backbone}.json"
    path.write_text(json.dumps(result, indent=2))
    echo(f"wrote {path}")
    return result


def add_ratios(rows: list[dict]) -> None:
    """Add `time_vs_ann_TB` and `saved_vs_ann_B` to every spiking row that has its ANN rows."""
    ann = {row["T"]: row for row in rows if row["method"] == "ann"}
    for row in rows:
        if row["method"] != "ann" and row["T"] in ann and 1 in ann:
            row["time_vs_ann_TB"] = row["ms_per_step"] / ann[row["T"]]["ms_per_step"]
            row["saved_vs_ann_B"] = row["saved_mb"] / ann[1]["saved_mb"]


def _gradients(method_model, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    method_model.model.train()
    method_model.model.zero_grad(set_to_none=True)
    loss, _ = method_model.forward_loss(x, y)
    loss.backward()
    return {name: p.grad.detach().clone() for name, p in method_model.model.named_parameters() if p.grad is not None}


def compare_gradients(exact: dict[str, torch.Tensor], representation: dict[str, torch.Tensor]) -> dict:
    """Per-parameter cosine similarity and relative difference of `representation` to `exact` (same keys)."""
    largest = max(g.norm().item() for g in exact.values())
    rows, structural = [], []
    for name, g in exact.items():
        r = representation[name]
        if g.norm().item() <= 1e-6 * largest:
            structural.append(name)
            continue
        cosine = torch.nn.functional.cosine_similarity(g.flatten().double(), r.flatten().double(), dim=0).item()
        rows.append({"parameter": name, "cosine": cosine, "relative_difference": ((r - g).norm() / g.norm()).item(),
                     "norm": g.norm().item()})
    whole = torch.nn.functional.cosine_similarity(torch.cat([exact[r["parameter"]].flatten() for r in rows]).double(),
                                                  torch.cat([representation[r["parameter"]].flatten()
                                                             for r in rows]).double(), dim=0).item()
    return {"parameters": rows, "structurally_zero": structural, "min_cosine": min(r["cosine"] for r in rows),
            "all_parameters_cosine": whole}


def gradient_agreement(recipe, weights: Path | dict | None = None, batches: int = 1) -> dict:
    """The backward bench (module docstring) on the first `batches` training batches of `recipe`'s data;
    `weights`: a checkpoint file, a state dict of the model, or None (fresh weights)."""
    from harness import data as datasets
    from harness.engine import checkpoint
    from harness.recipe import RecipeError

    if recipe.method.name != "dsr":
        raise RecipeError(f"method.name: the backward bench compares DSR's two backwards, got {recipe.method.name!r}")
    torch.manual_seed(recipe.seed)
    pipeline = datasets.build_pipeline(recipe.data, recipe.seed, 0, 1)
    info = methods.DataInfo(recipe.model.num_classes or pipeline.num_classes, pipeline.input_shape)
    built = {mode: methods.build(recipe.model, recipe.method.model_copy(update={"backward": mode}), info)
             for mode in ("exact", "representation")}
    state = (weights if isinstance(weights, dict) else checkpoint.load(weights)["model"] if weights is not None
             else built["exact"].model.state_dict())
    for method_model in built.values():
        method_model.model.load_state_dict(state)
    results = []
    for index, (x, y) in enumerate(pipeline.train):
        if index == batches:
            break
        grads = {mode: _gradients(m, x, y) for mode, m in built.items()}
        results.append(compare_gradients(grads["exact"], grads["representation"]))
    label = "state dict" if isinstance(weights, dict) else str(weights or "init")
    return {"recipe": recipe.name, "method": recipe.method.model_dump(mode="json"), "weights": label,
            "batch_size": recipe.data.batch_size, "batches": results,
            "min_cosine": min(r["min_cosine"] for r in results), "torch": torch.__version__}
