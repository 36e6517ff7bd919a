"""The README's promise, measured: the quickstart (DSR IF, T=4, mnist5k) reaches at least 96% test
accuracy, within 1 point of the same backbone trained as an ANN with the same budget (about 80 s on
2 CPU cores for both)."""

from pathlib import Path

import pytest

from harness.engine.launch import launch
from harness.recipe import load_recipe

pytestmark = pytest.mark.slow  # every test here trains through launch

RECIPES = Path(__file__).parent.parent / "recipes"


def test_quickstart_dsr_reaches_96_percent_within_1_point_of_the_ann(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = {}
    for name in ("quickstart", "quickstart_ann"):
        path = RECIPES / f"{name}.yaml"
        recipe = load_recipe(path, [f"track.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
                                    f"track.output_dir={tmp_path}/runs"])
        results[name] = launch(recipe, echo=lambda *_: None)["final_test_acc1"]
    assert results["quickstart"] >= 96.0, results
    assert results["quickstart_ann"] - results["quickstart"] <= 1.0, results
