"""The training step close to the hardware: health flags read one step late (no host synchronisation per step),
`engine.neuron_kernel`, `engine.compile` and `engine.channels_last` on the CPU.

On the CPU there is no stream to stall, so the tests pin down what makes the loop stall-free on a GPU: after
step k returns, step k's flags have not been read; they are read during step k+1 or by `settle()`, and a fault at
step k still stops the run naming step k, before anything is written.
"""

import pytest
import torch

from harness.engine.engines import NonFiniteError
from harness.engine.engines.base import PendingHealth
from harness.engine.loop import Trainer
from harness.recipe import load_recipe
from harness.snn import kernels
from tests.runhelpers import digits_recipe


def recipe_path(tmp_path, method=None, **sections):
    return digits_recipe(tmp_path, "step", method or {"name": "dsr", "neuron": "if", "T": 2, "vth": {"init": 2.0}},
                         {"seed": 3, "experiment": "step", "engine": {"threads": 1},
                          "optim": {"lr": 0.05, "epochs": 1, "warmup_iters": 0}}, sections)


def trainer_for(tmp_path, overrides=(), method=None, **sections) -> Trainer:
    trainer = Trainer(load_recipe(recipe_path(tmp_path, method, **sections), list(overrides)), tmp_path / "run")
    trainer.start()
    return trainer


def batches(trainer: Trainer, n: int):
    it = iter(trainer.data.train)
    return [next(it) for _ in range(n)]


@pytest.fixture(autouse=True)
def _default_kernel():
    yield
    kernels.select("auto")


def test_health_flags_are_read_one_step_late(tmp_path, monkeypatch):
    trainer = trainer_for(tmp_path)
    reads = []
    real_read = PendingHealth.read
    monkeypatch.setattr(PendingHealth, "read", lambda self: reads.append(self.step) or real_read(self))
    for step, (x, y) in enumerate(batches(trainer, 3), start=1):
        trainer.engine.train_step(x, y, step)
        assert trainer.engine.pending.step == step  # this step's flags are on their way, not read
        assert reads == list(range(1, step))  # the previous step's were read during this one
    assert trainer.engine.settle() is False
    assert reads == [1, 2, 3] and trainer.engine.pending is None


def test_a_nan_loss_stops_at_the_next_step_naming_its_step(tmp_path):
    trainer = trainer_for(tmp_path, method={"name": "ann"})  # (a DSR neuron never fires on NaN: finite loss)
    (x1, y1), (x2, y2) = batches(trainer, 2)
    trainer.engine.train_step(x1 * float("nan"), y1, 7)
    with pytest.raises(NonFiniteError, match=r"^step 7: the loss is not finite"):
        trainer.engine.train_step(x2, y2, 8)


def test_a_nan_gradient_is_named_from_the_device_norms(tmp_path):
    trainer = trainer_for(tmp_path)
    (x, y), = batches(trainer, 1)
    param = dict(trainer.model.named_parameters())["body.features.conv2.weight"]
    handle = param.register_hook(lambda g: g * float("nan"))
    trainer.engine.train_step(x, y, 4)
    handle.remove()
    with pytest.raises(NonFiniteError, match=r"^step 4: the gradient of body.features.conv2.weight is not finite"):
        trainer.engine.settle()


def test_skip_nonfinite_decides_at_once(tmp_path):
    trainer = trainer_for(tmp_path, optim={"skip_nonfinite": True})
    (x, y), = batches(trainer, 1)
    outcome = trainer.engine.train_step(x * float("nan"), y, 1)
    assert outcome.skipped and trainer.engine.pending is None


def test_neuron_kernel_choice_gives_the_same_step(tmp_path):
    """The fused kernel's spikes are the plain loop's: the same loss, bit for bit; gradients to round-off."""
    out = {}
    for choice in ("plain", "fused"):
        trainer = trainer_for(tmp_path, [f"engine.neuron_kernel={choice}"])
        assert kernels.selected() == choice
        (x, y), = batches(trainer, 1)
        loss = trainer.engine.train_step(x, y, 1).loss
        out[choice] = loss, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    assert torch.equal(out["plain"][0], out["fused"][0])
    for name, weight in out["plain"][1].items():
        torch.testing.assert_close(out["fused"][1][name], weight, rtol=1e-5, atol=1e-6)


def test_an_unknown_neuron_kernel_is_refused(tmp_path):
    from harness.recipe import RecipeError

    with pytest.raises(RecipeError, match="engine.neuron_kernel"):
        load_recipe(recipe_path(tmp_path), ["engine.neuron_kernel=fast"])


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["engine.compile=true", "engine.channels_last=true"])
def test_compiled_and_channels_last_steps_match_the_plain_step(tmp_path, setting):
    """The same step, the same loss and weights to float round-off (inductor and channels-last convolutions
    reorder sums); then two more steps run."""
    torch._dynamo.reset()
    out = {}
    for overrides in ((), (setting,)):
        trainer = trainer_for(tmp_path, overrides)
        data = batches(trainer, 3)
        losses = [trainer.engine.train_step(x, y, step).loss for step, (x, y) in enumerate(data, start=1)]
        trainer.engine.settle()
        out[overrides] = losses, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    (plain_losses, _), (losses, _) = out[()], out[(setting,)]
    torch.testing.assert_close(losses[0], plain_losses[0], rtol=1e-5, atol=1e-6)
    assert all(torch.isfinite(loss) for loss in losses)
    if setting == "engine.channels_last=true":
        conv = dict(trainer.model.named_parameters())["body.features.conv2.weight"]
        assert conv.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh runs it)")
def test_a_cuda_step_synchronises_only_on_the_step_before(tmp_path):
    """torch's sync debug mode reports every synchronising CUDA call; a step may wait once, for the previous step's
    flags (an event that is already done while this step is queued), and nothing else."""
    import warnings

    trainer = trainer_for(tmp_path, ["engine.device=cuda"])
    data = [(x.cuda(), y.cuda()) for x, y in batches(trainer, 4)]
    trainer.engine.train_step(*data[0], 1)  # the first step builds what it needs once
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for step, (x, y) in enumerate(data[1:], start=2):
                trainer.engine.train_step(x, y, step)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in seen if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= 3, syncs
