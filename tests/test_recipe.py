"""Recipe schema: defaults, overrides, and one-line errors that name the file and the field."""

import math

import pytest

from harness.engine.schedule import lr_multiplier
from harness.recipe import RecipeError, apply_override, flatten, load_recipe, recipe_to_yaml, validate_recipe


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_follow_dsr_md_for_if_and_lif(tmp_path):
    r_if = load_recipe(write(tmp_path, "name: a\nmethod: {name: dsr}\n"))
    assert (r_if.method.alpha, r_if.method.vth.init, r_if.method.vth.bound) == (0.5, 6.0, 0.01)
    r_lif = load_recipe(write(tmp_path, "name: a\nmethod: {name: dsr, neuron: lif}\n"))
    m = r_lif.method
    assert (m.alpha, m.vth.init, m.vth.bound, m.tau, m.dt) == (0.3, 0.3, 5e-4, 1.0, 0.05)
    assert r_lif.T == 4 and load_recipe(write(tmp_path, "name: a\n")).T is None  # ann has no T


def test_overrides_are_parsed_as_yaml_and_applied(tmp_path):
    path = write(tmp_path, "name: a\nmethod: {name: dsr}\n")
    r = load_recipe(path, ["optim.lr=0.05", "method.T=8", "data.augment=false", "track.tags.who=me",
                           "method.vth.train=false"])
    assert r.optim.lr == 0.05 and r.method.T == 8 and r.data.augment is False
    assert r.track.tags == {"who": "me"} and r.method.vth.train is False


def test_resolved_recipe_round_trips(tmp_path):
    r = load_recipe(write(tmp_path, "name: a\nmethod: {name: dsr, neuron: lif, T: 5}\n"))
    again = load_recipe(write(tmp_path, recipe_to_yaml(r), "again.yaml"))
    assert again == r
    flat = flatten(r)
    assert flat["method.T"] == 5 and flat["optim.lr"] == 0.1 and flat["model.kwargs"] == {}


@pytest.mark.parametrize("text,expected", [
    ("name: a\nmethod: {name: dsr, T: 0}\n", "method.T: Input should be greater than or equal to 1 (got 0)"),
    ("name: a\noptim: {lr: -0.1}\n", "optim.lr: Input should be greater than 0 (got -0.1)"),
    ("name: a\ndata: {batch_size: many}\n", "data.batch_size: Input should be a valid integer"),
    ("name: a\nbogus: 1\n", "bogus: unknown key; allowed: name, seed, data, model, method, optim, engine, track"),
    ("name: a\nmethod: {name: dsr, vth: {initial: 1}}\n",
     "method.vth.initial: unknown key; allowed: init, bound, grad_scale, train"),
    ("name: a\nmethod: {name: magic}\n", "method.name: unknown method 'magic'; allowed: ann, dsr"),
    ("name: a\nmethod: {name: dsr, alpha: 1.5}\n", "method.alpha: Input should be less than or equal to 1"),
    ("name: a\noptim: {name: lion}\n", "optim.name: Input should be 'sgd', 'adam' or 'adamw'"),
    ("seed: 1\n", "name: Field required"),
    ("- just\n- a list\n", "a recipe is a YAML mapping"),
])
def test_bad_fields_name_file_and_field(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message


def test_malformed_yaml_names_line(tmp_path):
    path = write(tmp_path, "name: a\ndata: {dataset: mnist5k\n")
    with pytest.raises(RecipeError, match=rf"^{path}: line \d+, column \d+: malformed YAML"):
        load_recipe(path)


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize("override,expected", [
    ("optim.lr", "expected key.path=value"), ("optim..lr=1", "empty key"),
    ("optim.lr.x=1", "optim.lr is not a section"), ("optim.lr=[1", "not valid YAML"),
])
def test_bad_overrides(override, expected):
    with pytest.raises(RecipeError, match=expected):
        apply_override({"optim": {"lr": 0.1}}, override)


def test_validate_rejects_non_mapping():
    with pytest.raises(RecipeError, match="src: a recipe is a YAML mapping"):
        validate_recipe(3, "src")


def test_schedule_is_cosine_over_epochs_with_linear_warmup():
    iters, epochs, warm = 10, 4, 15
    for i in range(iters * epochs):
        e = i // iters
        expected = min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * e / epochs))
        assert lr_multiplier(i, iters, epochs, warm, "cosine") == pytest.approx(expected, abs=1e-15)
    assert lr_multiplier(0, iters, epochs, 0, "cosine") == 1.0
    assert lr_multiplier(35, iters, epochs, 0, "constant") == 1.0
