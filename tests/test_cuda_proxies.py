"""CUDA hazards pinned down on the CPU, by proxy (issue 16): what a GPU run would write or see is built here (a
patched device count, a CUDA RNG state per visible GPU, CPU bf16 autocast, parameters released as ZeRO-3
releases them), and each test fails on the code that had the hazard. `bench/gpu_check.sh` confirms them on a
real GPU when one is lent.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from harness.engine import checkpoint
from harness.engine.build import pick_device
from harness.engine.distributed import ProcessInfo
from harness.engine.engines import LocalEngine
from harness.engine.schedule import build_scheduler
from harness.recipe import EngineConfig, RecipeError
from harness.snn import DSRIF, DSRLIF, QCFS, ConversionIF, convert_qcfs, kernels, repeat_time, sequence_to_time_major


class FakeCuda:
    """torch.cuda as a process that sees `visible` GPUs sees it: one RNG state per GPU, and "invalid device
    ordinal" for an index it does not see (what torch raises on a real machine)."""

    def __init__(self, visible: int):
        self.visible = visible
        self.states = {i: torch.full((16,), i, dtype=torch.uint8) for i in range(visible)}

    def _index(self, device) -> int:
        index = torch.device(device).index if not isinstance(device, int) else device
        index = 0 if index is None else index
        if index >= self.visible:
            raise RuntimeError(f"CUDA error: invalid device ordinal {index} (this process sees {self.visible})")
        return index

    def install(self, monkeypatch) -> "FakeCuda":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.visible)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": self.states[self._index(device)].clone())
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [self.states[i].clone() for i in self.states])

        def set_state(state, device="cuda"):
            self.states[self._index(device)] = state.clone()

        def set_all(states):
            for i, state in enumerate(states):
                set_state(state, i)

        monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)
        return self


# ------------------------------------------------------------------------------------ 1. CUDA RNG state on resume
def test_a_checkpoint_of_an_8_gpu_node_resumes_where_a_process_sees_one_gpu(monkeypatch):
    """Rank 3 of an 8-GPU torchrun node saves the state of its own GPU; resumed under srun with one GPU per task
    (the task sees only its GPU, as cuda:0), that state is restored into the one visible device."""
    node = FakeCuda(8).install(monkeypatch)
    node.states[3] = torch.full((16,), 42, dtype=torch.uint8)
    state = checkpoint.rng_state(torch.device("cuda", 3))
    assert torch.equal(state["cuda"], node.states[3])  # one state: this process's GPU
    task = FakeCuda(1).install(monkeypatch)
    checkpoint.set_rng_state(state, torch.device("cuda", 0))
    assert torch.equal(task.states[0], torch.full((16,), 42, dtype=torch.uint8))


def test_a_checkpoint_holding_one_state_per_gpu_still_resumes_on_fewer(monkeypatch):
    """Checkpoints written before (a list, one state per visible GPU) take the state of this process's index, or
    leave the generator alone where that GPU's state was not saved."""
    node = FakeCuda(8).install(monkeypatch)
    old_format = {**checkpoint.rng_state(), "cuda": torch.cuda.get_rng_state_all()}
    task = FakeCuda(1).install(monkeypatch)
    checkpoint.set_rng_state(old_format, torch.device("cuda", 0))
    assert torch.equal(task.states[0], node.states[0])
    FakeCuda(2).install(monkeypatch)
    checkpoint.set_rng_state({**old_format, "cuda": old_format["cuda"][:1]}, torch.device("cuda", 1))  # no error


def test_the_cpu_and_python_states_round_trip_without_cuda():
    import random

    state = checkpoint.rng_state(torch.device("cpu"))
    assert "cuda" not in state
    expected = (torch.rand(3), random.random())
    checkpoint.set_rng_state(state, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


# ------------------------------------------------------------------------------------ 2. resume across precisions
def _engine(precision: str) -> LocalEngine:
    """A local engine in `precision` on the CPU (built directly: `pick_device` keeps fp16 to CUDA, but its
    GradScaler runs on any device), set up around a small model."""
    torch.manual_seed(0)
    engine = LocalEngine(EngineConfig(precision=precision, device="cpu"), None, ProcessInfo(), torch.device("cpu"))
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    class Step(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x, y):
            logits = self.net(x)
            return nn.functional.cross_entropy(logits.float(), y), logits

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine.setup(Step(), model, optimizer, lambda opt: build_scheduler(opt, 10, 1, 0, "cosine"))
    return engine


@pytest.mark.parametrize("before, after", [("fp32", "fp16"), ("bf16", "fp16"), ("fp16", "fp32"), ("fp16", "bf16")])
def test_a_run_resumes_in_another_precision(before, after):
    """A disabled scaler (fp32, bf16) saves an empty state, which an enabled one (fp16) used to refuse to load
    ("the source state dict is empty"); now the fp16 run starts from the initial loss scale."""
    writer = _engine(before)
    x, y = torch.randn(6, 8), torch.randint(0, 4, (6,))
    writer.train_step(x, y, 1)
    writer.settle()
    state = writer.checkpoint_state(None, "epoch1")
    reader = _engine(after)
    assert reader.scaler.is_enabled() == (after == "fp16")  # the fp16 scaler is a real one, on this device
    reader.load_checkpoint_state(state, None)
    for name, value in reader.model.state_dict().items():
        assert torch.equal(value, state["model"][name])
    if after == "fp16":
        assert reader.scaler.get_scale() == torch.amp.GradScaler("cpu").get_scale()
    reader.train_step(x, y, 2)
    assert reader.settle() is False



@pytest.mark.slow
def test_a_bf16_run_resumes_in_fp32_through_launch_into_the_same_mlflow_run(tmp_path, monkeypatch):
    """The whole path on the CPU (bf16 autocast runs there; fp16 needs CUDA: bench/gpu_check.sh resumes a bf16 run
    in fp16 on the GPU): one epoch in bf16, then `--resume latest` with engine.precision fp32 for a second."""
    import mlflow

    from harness.engine.launch import launch
    from harness.recipe import load_recipe
    from tests.runhelpers import digits_recipe

    monkeypatch.chdir(tmp_path)
    path = digits_recipe(tmp_path, "precision", {"name": "dsr", "neuron": "if", "T": 2, "vth": {"init": 1.0}},
                         {"experiment": "precision", "engine": {"precision": "bf16", "threads": 1},
                          "optim": {"epochs": 1, "lr": 0.05}}, {})
    first = launch(load_recipe(path), echo=lambda *_: None)
    resumed = launch(load_recipe(path, ["optim.epochs=2", "engine.precision=fp32"]), resume="latest",
                     echo=lambda *_: None)
    assert resumed["mlflow_run_id"] == first["mlflow_run_id"] and resumed["run_dir"] == first["run_dir"]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [m.step for m in client.get_metric_history(first["mlflow_run_id"], "test/acc1")] == [1, 2]
    assert checkpoint.load(Path(first["run_dir"]) / checkpoint.LAST)["epoch"] == 2

# ------------------------------------------------------------------------------------ 3. one GPU per process
@pytest.mark.parametrize("visible, local_rank, environ, expected", [
    (2, 1, {}, "cuda:1"),
    (8, 7, {}, "cuda:7"),
    (1, 0, {}, "cuda:0"),
    (1, 3, {"SLURM_STEP_GPUS": "0,1,2,3"}, "cuda:0"),  # srun --gpus-per-task=1: each task sees its own GPU
])
def test_each_process_gets_a_gpu_of_its_own(monkeypatch, visible, local_rank, environ, expected):
    FakeCuda(visible).install(monkeypatch)
    launcher = "slurm" if environ else "torchrun"
    process = ProcessInfo(rank=local_rank, world_size=8, local_rank=local_rank, launcher=launcher)
    assert str(pick_device(EngineConfig(), process, environ)) == expected


@pytest.mark.parametrize("visible, local_rank, launcher, environ", [
    (2, 2, "torchrun", {}),  # torchrun --nproc_per_node 3 on a node of 2 GPUs: local_rank % 2 shared GPU 0
    (1, 1, "torchrun", {}),
    (1, 1, "slurm", {"SLURM_STEP_GPUS": "0"}),  # srun --ntasks-per-node=2 --gpus-per-node=1
    (4, 5, "slurm", {"SLURM_STEP_GPUS": "0,1,2,3"}),
])
def test_more_processes_than_gpus_on_a_node_is_refused_at_start(monkeypatch, visible, local_rank, launcher, environ):
    FakeCuda(visible).install(monkeypatch)
    process = ProcessInfo(rank=local_rank, world_size=8, local_rank=local_rank, launcher=launcher)
    with pytest.raises(RecipeError, match=rf"^engine.device: process {local_rank} is local rank {local_rank} on its "
                                          rf"node but sees {visible} GPU\(s\) \({launcher}\): two processes would "
                                          r"share a GPU.*engine.device: cpu$"):
        pick_device(EngineConfig(), process, environ)


def test_engine_device_cpu_never_looks_for_a_gpu(monkeypatch):
    FakeCuda(1).install(monkeypatch)
    process = ProcessInfo(rank=5, world_size=8, local_rank=5, launcher="torchrun")
    assert pick_device(EngineConfig(device="cpu"), process, {}) == torch.device("cpu")


# ------------------------------------------------------------------------------------ 4. QCFS under bf16 autocast
@pytest.mark.parametrize("L, lam", [(8, 6.3), (4, 4.7), (16, 7.9)])
def test_qcfs_under_bf16_autocast_quantises_as_its_converted_snn_fires_at_T_equal_L(L, lam):
    """Under autocast the conv hands QCFS a bf16 tensor; lambda is a 0-dim fp32 tensor, which does not promote, so
    `z/lam`, `*L + 1/2` and the floor ran in bf16 (a step of 0.03-0.06 near lambda = 4-8) and moved the
    quantisation boundaries away from the levels the converted IF neuron (fp32 membrane) fires. Now the ANN's
    level k = QCFS(z)*L/lambda is the converted SNN's spike count at T=L, for every input, and the formula's."""
    act = QCFS(L=L, lambda_init=lam)
    z = (torch.linspace(-1.0, 1.2 * lam, 6007) + 1e-3 * torch.randn(6007, generator=torch.Generator().manual_seed(0)))
    z = z.to(torch.bfloat16)  # what a conv under bf16 autocast hands the activation
    snn = ConversionIF(T=L, vth=act.lam)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        ann = act(z)
        spikes = snn(z.repeat(L))
    assert ann.dtype == torch.bfloat16  # the activation keeps the dtype autocast gave it
    ann_levels = torch.round(ann.float() * L / act.lam.detach()).long()  # bf16 keeps k * lambda/L to 3 digits
    snn_levels = (spikes.reshape(L, -1) != 0).sum(0)
    position = z.double() * L / act.lam.detach().double() + 0.5  # in float64: where z lies between the levels
    formula = torch.clamp(torch.floor(position), 0, L).long()
    # bf16 inputs are coarse enough to land on a boundary lambda*(k - 1/2)/L to within fp32's rounding (about
    # 1e-7 relative): such ties are decided by the last bit of fp32 arithmetic, in the ANN and the SNN alike
    clear = (position - position.round()).abs() > 1e-5
    assert clear.sum() > 0.99 * len(z)
    assert torch.equal(snn_levels[clear], formula[clear])
    assert torch.equal(ann_levels[clear], snn_levels[clear]), (ann_levels != snn_levels)[clear].sum()


def test_qcfs_gradient_under_bf16_autocast_is_straight_through_in_the_input_dtype():
    act = QCFS(L=4, lambda_init=6.3)
    z = torch.tensor([-1.0, 0.5, 3.0, 6.0, 9.0], dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        act(z).sum().backward()
    assert z.grad.dtype == torch.bfloat16 and z.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert act.lam.grad.dtype == torch.float32 and torch.isfinite(act.lam.grad)


# ------------------------------------------------------------------------------------ 5. devices and ZeRO-3 hooks
def test_a_converted_snn_stays_on_the_device_of_its_ann():
    """The ANN on another device than the CPU (here `meta`, which allocates nothing and refuses host reads): every
    parameter and buffer of the converted network is on that device, the thresholds included, and no lambda was
    read back to the host to build them."""
    ann = nn.Sequential(nn.Conv2d(3, 8, 3), QCFS(L=4, lambda_init=5.0), nn.Flatten(), nn.LazyLinear(4))
    ann(torch.zeros(1, 3, 8, 8))
    snn = convert_qcfs(ann.to("meta"), T=4)
    tensors = dict(snn.named_parameters()) | dict(snn.named_buffers())
    assert "body.1.vth" in tensors and {str(t.device) for t in tensors.values()} == {"meta"}
    neuron = snn.body[1]
    assert isinstance(neuron, ConversionIF) and neuron.vth.dtype == torch.float32 and neuron.vth.dim() == 0


def _release_weights_after_forward(model: nn.Module) -> None:
    """What DeepSpeed ZeRO-3 does to each layer: gather its partitioned weight before the forward (a pre-hook)
    and release it right after (a hook registered before any other, so it runs first), leaving an empty tensor."""
    for layer in model.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            full = layer.weight.data

            def gather(module, _inputs, full=full):
                module.weight.data = full

            def release(module, _inputs, _output):
                module.weight.data = torch.empty(0)

            layer.register_forward_pre_hook(gather)
            layer.register_forward_hook(release)


def test_synaptic_operation_counts_do_not_read_weights_that_zero3_has_released():
    from harness.snn.stats import FiringRateMonitor

    def counted(release: bool) -> dict:
        torch.manual_seed(0)
        body = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), DSRIF(T=2, vth=0.5), nn.Conv2d(4, 4, 3, stride=2),
                             DSRIF(T=2, vth=0.5), nn.Flatten(), nn.Linear(4 * 3 * 3, 3))
        if release:
            _release_weights_after_forward(body)
        x = torch.rand(2 * 5, 2, 8, 8)
        with torch.no_grad(), FiringRateMonitor(body) as monitor:
            body(x)
        return monitor.accumulates | {"mean_rate": monitor.mean_rate()}

    plain = counted(release=False)
    assert plain["2"] > 0 and plain == counted(release=True)


# ------------------------------------------------------------------------------------ 6. DSR backward in bf16
class AllocationLog(TorchDispatchMode):
    """Every tensor an aten op returns while active: (op, dtype, number of elements)."""

    def __init__(self):
        super().__init__()
        self.outputs: list[tuple[str, torch.dtype, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.outputs.append((str(func), t.dtype, t.numel()))
        return out


@pytest.mark.parametrize("neuron", ["if", "lif"])
def test_the_plain_dsr_backward_in_bf16_makes_no_fp32_copy_of_the_time_merged_gradient(neuron):
    """Under bf16 the backward used to copy the whole `[T, B, ...]` upstream gradient to fp32 before summing over T,
    and to expand the input gradient over T in fp32 before casting it: two fp32 tensors of T*B*... elements (twice
    the bf16 gradient's memory each). Now the sum accumulates in fp32 while reading bf16, and the gradient is
    cast before it is expanded: no op of the backward returns an fp32 tensor of the time-merged size. The
    gradients are those of the formulas (DSR.md section 2), computed here in float64."""
    T, B, C = 4, 8, 64
    layer = (DSRIF(T=T, vth=1.0) if neuron == "if" else DSRLIF(T=T, vth=1.0, tau=2.0, dt=1.0))
    x = (torch.rand(T * B, C) * 1.5 - 0.2).to(torch.bfloat16).requires_grad_()
    g = torch.randn(T * B, C).to(torch.bfloat16)
    with kernels.using("plain"):
        out = layer(x)
        log = AllocationLog()
        with log:
            out.backward(g)
    full_fp32 = [(op, n) for op, dtype, n in log.outputs if dtype == torch.float32 and n >= T * B * C]
    assert full_fp32 == [] and x.grad.dtype == torch.bfloat16
    steps, grads = x.detach().double().view(T, B, C), g.double().view(T, B, C)
    if neuron == "if":
        rep, G = steps.mean(0), grads.sum(0)
        expected = G / T * ((rep >= 0) & (rep <= 1.0))
    else:
        w = torch.tensor([math.exp(-(T - 1 - t) / 2.0) for t in range(T)], dtype=torch.float64)
        rep = (w.view(T, 1, 1) * steps).sum(0) / w.sum()
        G = T * (w.view(T, 1, 1) * grads).sum(0) / w.sum()
        expected = G / (2.0 * T) * ((rep > 0) & (rep < 1.0 * 2.0 / 1.0))
    # bf16 keeps 8 bits: the gradient is exact to its rounding, 2^-8 relative
    torch.testing.assert_close(x.grad.double().view(T, B, C), expected.expand(T, B, C), rtol=2 ** -8, atol=1e-6)


# ------------------------------------------------------------------------------------ 7. batch norm across processes
def test_global_batch_norm_makes_one_collective_per_layer_and_no_host_read(monkeypatch):
    """In a process group of one (the all-gather is the identity), a GlobalBatchNorm made to act as if it spanned
    processes gives BatchNorm's training output, gradients and running statistics, with one collective per
    forward (it was two dependent all-reduces) and no host read (no `_local_scalar_dense`, which `.item()` and
    `float()` of a device tensor cost on CUDA), momentum None included."""
    from harness.engine import sync_bn

    calls = []
    monkeypatch.setattr(sync_bn, "all_gather_differentiable", lambda t: calls.append(t.shape) or t.unsqueeze(0))
    monkeypatch.setattr(sync_bn.GlobalBatchNorm, "spans_processes", staticmethod(lambda: True))
    for momentum in (0.1, None):
        torch.manual_seed(0)
        plain = nn.BatchNorm2d(6, momentum=momentum)
        with torch.no_grad():
            plain.running_mean.uniform_(2.0, 4.0)
            plain.weight.uniform_(0.5, 1.5)
        glob = sync_bn.convert_to_global_batchnorm(nn.Sequential(plain)).to(torch.float32)[0]
        glob.load_state_dict(plain.state_dict())
        x = (torch.randn(16, 6, 5, 5) * 0.3 + 3.0).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        r = torch.randn(16, 6, 5, 5)  # a loss whose gradient through the normalisation is not zero
        calls.clear()
        log = AllocationLog()
        for _ in range(2):
            with log:
                y = glob(x2)
            (y * r).sum().backward()
            (plain(x) * r).sum().backward()
        assert len(calls) == 2 and calls[0] == torch.Size([1 + 2 * 6])  # one collective of (n, mean, M2) a forward
        assert not [op for op, _, _ in log.outputs if "_local_scalar_dense" in op]
        reference = plain(x)
        torch.testing.assert_close(glob(x2), reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-5)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(glob, name), getattr(plain, name), rtol=1e-5, atol=1e-6)


def test_ddp_does_not_broadcast_buffers_before_every_forward(tmp_path):
    """`apply_ddp` syncs parameters and buffers once, at wrapping; DDP's per-forward buffer broadcast (its default)
    is off: batch-norm statistics are global under sync_bn and broadcast after each epoch without it."""
    import torch.distributed as dist

    from harness.engine.distributed import apply_ddp

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ddp = apply_ddp(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), torch.device("cpu"))
        assert ddp.will_sync_module_buffers() is False
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------ 8. GPU defaults
def test_the_time_encoders_keep_a_channels_last_batch_channels_last():
    """`engine.channels_last` puts the batch in channels-last layout; the direct encoder (and the frame encoder,
    for frames stored channels-last per frame) used to return NCHW-contiguous `[T*B, ...]`, so the first conv
    got a layout other than its weights'. Same values either way."""
    from harness.engine.engines.base import to_layout

    images = torch.randn(3, 4, 5, 6)
    encoded = repeat_time(to_layout(images, torch.float32, True), 2)
    assert encoded.is_contiguous(memory_format=torch.channels_last) and torch.equal(encoded, repeat_time(images, 2))
    frames = torch.randn(3, 2, 4, 5, 6)  # [B, T, C, H, W]
    stored = to_layout(frames, torch.float32, True)
    assert stored.shape == frames.shape and stored.permute(0, 1, 3, 4, 2).is_contiguous()
    encoded = sequence_to_time_major(stored)
    assert encoded.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(encoded, sequence_to_time_major(frames))
    assert repeat_time(images, 2).is_contiguous()  # NCHW stays NCHW


@pytest.mark.parametrize("neuron", ["dsr_if", "dsr_lif", "sg"])
def test_every_conv_of_a_spiking_network_sees_channels_last_inputs(neuron):
    """A channels-last spiking network on a channels-last batch: the encoder, the neurons (DSR's kernels keep the
    strides; SG's steps are concatenated, not stacked) and the layers between them keep the layout, so no conv
    gets an NCHW input; the logits equal the NCHW network's to float round-off."""
    from harness.snn import SGIF, spikify

    make = {"dsr_if": lambda: DSRIF(T=3, vth=1.0), "dsr_lif": lambda: DSRLIF(T=3, vth=0.3, tau=1.0, dt=0.1),
            "sg": lambda: SGIF(T=3)}[neuron]
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    snn = spikify(ann, make, T=3).eval()
    x = torch.randn(2, 3, 8, 8) * 3
    reference = snn(x)
    layouts = []
    hooks = [m.register_forward_pre_hook(lambda _m, inputs: layouts.append(
        inputs[0].is_contiguous(memory_format=torch.channels_last))) for m in snn.modules() if isinstance(m, nn.Conv2d)]
    snn = snn.to(memory_format=torch.channels_last)
    out = snn(x.contiguous(memory_format=torch.channels_last))
    for hook in hooks:
        hook.remove()
    assert layouts == [True, True]
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_cuda_settings_are_set_only_for_a_cuda_device():
    from harness.engine.build import configure_cuda

    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = False
        configure_cuda(EngineConfig(), torch.device("cpu"))
        assert (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32) == (False, False)
        configure_cuda(EngineConfig(), torch.device("cuda", 0))  # the defaults: cuDNN autotuner and TF32 on
        assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32
        configure_cuda(EngineConfig(cudnn_benchmark=False, tf32=False), torch.device("cuda", 0))
        assert not (torch.backends.cudnn.benchmark or torch.backends.cuda.matmul.allow_tf32)
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_the_optimizer_is_fused_only_on_cuda_parameters():
    from harness.engine.build import build_optimizer
    from harness.recipe import OptimConfig

    model = nn.Linear(3, 2)
    for name in ("sgd", "adam", "adamw"):
        optimizer = build_optimizer(OptimConfig(name=name), model, fused=True)
        assert not optimizer.defaults.get("fused")  # CPU parameters: torch's for-each implementation


def test_the_engines_fuse_the_optimizer_on_cuda_except_deepspeed():
    from harness.engine.engines import DeepSpeedEngine

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")  # engines are built without touching the device
    assert LocalEngine(EngineConfig(), None, ProcessInfo(), cuda).fuses_optimizer
    assert not LocalEngine(EngineConfig(), None, ProcessInfo(), cpu).fuses_optimizer
    assert not LocalEngine(EngineConfig(fused_optimizer=False), None, ProcessInfo(), cuda).fuses_optimizer
    assert not DeepSpeedEngine(EngineConfig(kind="deepspeed"), None, ProcessInfo(), cuda, 8).fuses_optimizer


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh runs it)")
def test_on_cuda_the_optimizer_is_fused_and_qcfs_converts_exactly_under_bf16(tmp_path):
    from harness.engine.build import build_optimizer
    from harness.recipe import OptimConfig

    model = nn.Linear(3, 2).cuda()
    assert build_optimizer(OptimConfig(name="adamw"), model, fused=True).defaults["fused"] is True
    act = QCFS(L=8, lambda_init=6.3).cuda()
    z = (torch.linspace(-1.0, 7.5, 6007, device="cuda")).to(torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        ann, spikes = act(z), ConversionIF(T=8, vth=act.lam)(z.repeat(8))
    position = z.double() * 8 / act.lam.detach().double() + 0.5
    clear = (position - position.round()).abs() > 1e-5
    ann_levels = torch.round(ann.float() * 8 / act.lam.detach()).long()
    assert torch.equal(ann_levels[clear], (spikes.reshape(8, -1) != 0).sum(0)[clear])
    state = checkpoint.rng_state(torch.device("cuda", 0))
    expected = torch.rand(4, device="cuda")
    checkpoint.set_rng_state(state, torch.device("cuda", 0))
    assert torch.equal(torch.rand(4, device="cuda"), expected)


# ------------------------------------------------------------------------------------ 9. DeepSpeed CPU offload
@pytest.mark.slow
def test_an_offloaded_adam_becomes_deepspeeds_cpu_adam_with_the_same_step():
    """Where ZeRO-Offload runs the optimizer step on the CPU, torch's Adam/AdamW are replaced by DeepSpeed's CPU Adam
    (DeepSpeed builds its C++ op the first time, about a minute); its steps equal torch's to float round-off,
    weight decay included (decoupled for AdamW, L2 for Adam); SGD, which DeepSpeed has no CPU version of, stays."""
    pytest.importorskip("deepspeed")
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from harness.engine.build import build_optimizer
    from harness.engine.engines.deepspeed import cpu_adam_for
    from harness.recipe import OptimConfig

    for name in ("adamw", "adam"):
        torch.manual_seed(0)
        ours, theirs = nn.Linear(6, 3), nn.Linear(6, 3)
        theirs.load_state_dict(ours.state_dict())
        config = OptimConfig(name=name, lr=0.01, weight_decay=0.1)
        reference = build_optimizer(config, ours)
        offloaded = cpu_adam_for(build_optimizer(config, theirs))
        assert isinstance(offloaded, DeepSpeedCPUAdam) and offloaded.adam_w_mode == (name == "adamw")
        for _ in range(3):
            x = torch.randn(8, 6)
            for model, optimizer in ((ours, reference), (theirs, offloaded)):
                optimizer.zero_grad()
                model(x).square().mean().backward()
                optimizer.step()
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    sgd = build_optimizer(OptimConfig(name="sgd"), nn.Linear(2, 2))
    assert cpu_adam_for(sgd) is sgd


@pytest.mark.slow
def test_deepspeed_refuses_to_resume_in_another_precision_in_one_line(tmp_path):
    """DeepSpeed's checkpoint holds its module and loss-scaler states in the precision that wrote them: a resume in
    another one is refused (exit 2, one line naming the field and both precisions), before DeepSpeed loads it."""
    pytest.importorskip("deepspeed")
    from tests.runhelpers import digits_recipe

    path = digits_recipe(tmp_path, "ds_precision", {"name": "ann"},
                         {"experiment": "precision", "engine": {"kind": "deepspeed", "threads": 1,
                                                                "deepspeed": {"stage": 1}},
                          "optim": {"epochs": 1, "lr": 0.05}}, {})
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(Path(__file__).parents[1])}
    command = [sys.executable, "-m", "harness.cli", "launch", str(path)]
    first = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = subprocess.run([*command, "--resume", "latest", "-o", "optim.epochs=2", "-o", "engine.precision=bf16"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in resumed.stderr.splitlines() if line.startswith("error")]
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    assert len(lines) == 1 and "engine.precision: the DeepSpeed checkpoint" in lines[0]
    assert "written in fp32" in lines[0] and "resume with engine.precision fp32" in lines[0]
