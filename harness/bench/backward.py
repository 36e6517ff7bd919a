"""`harness bench backward`: how far DSR's representation-space backward is from the exact one, per parameter.

For a DSR recipe, one training batch of its data, the model built twice with the same weights (fresh, or
`--weights` from a checkpoint), one backward in each mode in training mode: per parameter, the cosine
similarity of the representation gradient to the exact one and their relative difference
`|g_repr - g_exact| / |g_exact|`. Parameters whose exact gradient is structurally zero (a bias followed by
batch norm: norm below 1e-6 of the largest) are listed apart. Results go to
`results/bench/backward_<recipe name>_<label>.json`.
"""

from pathlib import Path

import torch

from harness import methods


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
