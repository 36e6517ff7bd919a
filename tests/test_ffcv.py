"""FFCV for real: small data sets in their on-disk formats are converted by `harness data write-ffcv`, read
back through FFCV Loaders and compared with the torch readers; a recipe trains one epoch on them through
`launch` (MLflow on sqlite in tmp_path); two gloo processes shard an epoch; bad files exit 2."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fakedata import write_cifar10, write_cifar100, write_jpegs

pytest.importorskip("ffcv", reason="ffcv is not installed (needs libturbojpeg0-dev, libopencv-dev and pip ffcv)")

from harness.cli import main, run  # noqa: E402
from harness.data import build_datasets, build_pipeline, set_epoch  # noqa: E402
from harness.data.ffcv import FfcvLoader  # noqa: E402
from harness.data.pipeline import choose_loader  # noqa: E402
from harness.recipe import DataConfig  # noqa: E402

HARNESS = str(Path(sys.executable).with_name("harness"))


def write_ffcv(*args: str) -> None:
    result = CliRunner().invoke(main, ["data", "write-ffcv", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def everything(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def reference(split) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([split[i][0] for i in range(len(split))]), torch.tensor([split[i][1] for i in range(len(split))])


@pytest.fixture
def cifar10(tmp_path):
    """CIFAR-10 pickles (20 train, 7 test) and their two .beton files."""
    write_cifar10(tmp_path / "c10", per_batch=4, test=7, seed=0)
    for split in ("train", "val"):
        write_ffcv("--dataset", "cifar10", "--root", str(tmp_path / "c10"), "--split", split,
                   "--out", str(tmp_path / f"c10_{split}.beton"))
    return tmp_path


# --- same samples as the torch readers -------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_ffcv_yields_the_torch_readers_samples(tmp_path, dataset):
    root = tmp_path / dataset
    if dataset == "cifar10":
        write_cifar10(root, per_batch=4, test=7, seed=0)
    else:
        write_cifar100(root, train=12, test=7, seed=1)
    splits = build_datasets(dataset, str(root), augment=False)
    for split, data in (("train", splits.train), ("val", splits.val)):
        out = tmp_path / f"{split}.beton"
        write_ffcv("--dataset", dataset, "--root", str(root), "--split", split, "--out", str(out))
        x, y = everything(FfcvLoader(out, dataset, batch_size=3, workers=1, seed=0, train=False))
        ref_x, ref_y = reference(data)
        assert x.dtype == torch.float32 and x.shape == (len(data), 3, 32, 32)
        assert y.dtype == torch.int64 and y.shape == (len(data),)
        assert torch.equal(x, ref_x) and torch.equal(y, ref_y)  # raw storage, same normalisation: bit for bit
        # the GPU path: uint8 batches normalised after FFCV (on the CUDA device; here on the CPU), channels-last
        batches = list(FfcvLoader(out, dataset, batch_size=3, workers=1, seed=0, train=False,
                                  normalise_after_batching=True))
        assert all(b.is_contiguous(memory_format=torch.channels_last) for b, _ in batches)
        x_after, y_after = torch.cat([b for b, _ in batches]), torch.cat([label for _, label in batches])
        assert torch.equal(x_after, ref_x) and torch.equal(y_after, ref_y)


def test_imagenet_ffcv_matches_torch_exactly_raw_and_closely_as_jpeg(tmp_path):
    root = tmp_path / "imagenet"
    for split, seed in (("train", 0), ("val", 1)):
        for index, wnid in enumerate(("n01", "n02")):
            write_jpegs(root / split / wnid, [(256, 256), (256, 256)], seed=10 * seed + index)
    splits = build_datasets("imagenet", str(root), augment=False)
    ref_x, ref_y = reference(splits.val)
    # raw pixels of 256x256 images: Resize(256) is the identity and both centre crops take rows/cols 16..239
    write_ffcv("--dataset", "imagenet", "--root", str(root), "--split", "val", "--write-mode", "raw",
               "--out", str(tmp_path / "raw.beton"))
    x, y = everything(FfcvLoader(tmp_path / "raw.beton", "imagenet", batch_size=3, workers=1, seed=0, train=False))
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(y, ref_y) and torch.equal(x, ref_x)
    # JPEG storage at quality 95 re-encodes the decoded pixels once: noise images lose a few grey levels
    write_ffcv("--dataset", "imagenet", "--root", str(root), "--split", "val", "--jpeg-quality", "95",
               "--out", str(tmp_path / "jpg.beton"))
    x, y = everything(FfcvLoader(tmp_path / "jpg.beton", "imagenet", batch_size=3, workers=1, seed=0, train=False))
    pixel_error = ((x - ref_x) * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255).abs()
    assert torch.equal(y, ref_y) and pixel_error.mean() < 12 and pixel_error.mean() > 0


@pytest.mark.slow
def test_imagenet_of_mixed_sizes_centre_crops_like_resize_and_crop(tmp_path):
    root = tmp_path / "imagenet"
    for split in ("train", "val"):
        write_jpegs(root / split / "n01", [(300, 200), (180, 240)], seed=3)
    for folder in (root / "train" / "n01", root / "val" / "n01"):  # smooth images: interpolation differs little
        for path in folder.iterdir():
            from PIL import Image

            ramp = np.add.outer(np.arange(Image.open(path).height), np.arange(Image.open(path).width)) % 256
            Image.fromarray(np.stack([ramp, ramp[::-1], 255 - ramp], -1).astype(np.uint8)).save(path, quality=95)
    splits = build_datasets("imagenet", str(root), augment=False)
    ref_x, _ = reference(splits.val)
    write_ffcv("--dataset", "imagenet", "--root", str(root), "--split", "val", "--write-mode", "raw",
               "--out", str(tmp_path / "val.beton"))
    x, _ = everything(FfcvLoader(tmp_path / "val.beton", "imagenet", batch_size=2, workers=1, seed=0, train=False))
    assert x.shape == (2, 3, 224, 224)
    pixel_error = ((x - ref_x) * 0.226 * 255).abs()
    assert pixel_error.mean() < 3  # same crop window; cv2 INTER_AREA vs antialiased bilinear resampling
    write_ffcv("--dataset", "imagenet", "--root", str(root), "--split", "train", "--out", str(tmp_path / "t.beton"))
    train = FfcvLoader(tmp_path / "t.beton", "imagenet", batch_size=2, workers=1, seed=0, train=True)
    x, y = next(iter(train))
    assert x.shape == (2, 3, 224, 224) and y.shape == (2,)


def test_cifar_training_pipeline_crops_and_flips(cifar10):
    train = FfcvLoader(cifar10 / "c10_train.beton", "cifar10", batch_size=4, workers=1, seed=0, train=True)
    originals = reference(build_datasets("cifar10", str(cifar10 / "c10"), augment=False).train)[0]
    mean = torch.tensor((0.4914, 0.4822, 0.4465)).view(1, 3, 1, 1)
    std = torch.tensor((0.2023, 0.1994, 0.2010)).view(1, 3, 1, 1)
    padded = torch.nn.functional.pad(originals * std + mean, (4, 4, 4, 4), value=0.0)  # fill: pixel value 0
    x, _ = everything(train)
    assert x.shape == (20, 3, 32, 32)
    windows = [padded[:, :, top:top + 32, left:left + 32] for top in range(9) for left in range(9)]
    candidates = torch.cat(windows + [w.flip(-1) for w in windows])
    moved = 0
    for sample in x[:8] * std + mean:  # each is a 32x32 window of a zero-padded original, maybe mirrored
        distance = (candidates - sample).abs().amax(dim=(1, 2, 3))
        assert distance.min() < 1e-5
        moved += int(distance[40 * len(originals):41 * len(originals)].min() > 1e-5)  # not the unshifted original
    assert moved > 0


# --- order, epochs, one loader per run -------------------------------------------------------------------


def test_set_epoch_fixes_the_order_and_epochs_differ(cifar10):
    train = FfcvLoader(cifar10 / "c10_train.beton", "cifar10", batch_size=4, workers=1, seed=5, train=True,
                       augment=False)
    assert len(train) == 5

    def labels_of(epoch):
        set_epoch(train, epoch)
        return [x[:, 0, 0, 0].tolist() for x, _ in train]

    assert labels_of(2) == labels_of(2) and labels_of(2) != labels_of(3)
    with pytest.raises(TypeError):
        set_epoch(torch.utils.data.DataLoader(range(3)), 0)


def test_auto_picks_ffcv_only_with_beton_files(cifar10):
    torch_cfg = DataConfig(dataset="cifar10", root=str(cifar10 / "c10"), batch_size=4)
    assert choose_loader(torch_cfg)[0] == "torch"
    ffcv_cfg = DataConfig(dataset="cifar10", train=str(cifar10 / "c10_train.beton"),
                          val=str(cifar10 / "c10_val.beton"), batch_size=4)
    pipeline = build_pipeline(ffcv_cfg, seed=0)
    assert pipeline.kind == "ffcv" and pipeline.num_classes == 10 and pipeline.input_shape == (3, 32, 32)
    assert (pipeline.train_size, len(pipeline.train), len(pipeline.val)) == (20, 5, 2)
    assert pipeline.note.startswith("cifar10 through the ffcv loader (")


@pytest.mark.slow
def test_one_epoch_of_a_recipe_on_ffcv_through_launch(cifar10, tmp_path):
    from mlflow.tracking import MlflowClient

    from harness.engine.launch import launch
    from harness.recipe import load_recipe

    recipe_path = tmp_path / "ffcv.yaml"
    recipe_path.write_text(f"""
name: cifar_ffcv
data: {{dataset: cifar10, loader: ffcv, train: {cifar10}/c10_train.beton, val: {cifar10}/c10_val.beton,
        batch_size: 4}}
model: {{backbone: snn_convnet}}
method: {{name: dsr, neuron: if, T: 2, vth: {{init: 2.0}}}}
optim: {{name: sgd, lr: 0.05, epochs: 1}}
track: {{experiment: tests, tracking_uri: "sqlite:///{tmp_path}/mlflow.db", output_dir: "{tmp_path}/runs"}}
""")
    said: list[str] = []
    summary = launch(load_recipe(recipe_path), echo=said.append)
    assert summary["epochs"] == 1 and 0 <= summary["final_test_acc1"] <= 100
    assert sum("through the ffcv loader" in line for line in said) == 1
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["data.loader"] == "ffcv"


# --- two processes ----------------------------------------------------------------------------------------


def shard_worker(rank: int, world_size: int, cfg: DataConfig, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    pipeline = build_pipeline(cfg, seed=7, rank=rank, world_size=world_size)
    seen = {}
    for epoch in (0, 1):
        set_epoch(pipeline.train, epoch)
        seen[f"train{epoch}"] = [x.numpy().tobytes() for batch, _ in pipeline.train for x in batch]
    seen["val"] = [x.numpy().tobytes() for batch, _ in pipeline.val for x in batch]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, seen)
    if rank == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_see_each_sample_once_per_epoch(cifar10, tmp_path):
    cfg = DataConfig(dataset="cifar10", loader="ffcv", train=str(cifar10 / "c10_train.beton"),
                     val=str(cifar10 / "c10_val.beton"), batch_size=4, augment=False)
    port = 29500 + os.getpid() % 1000
    torch.multiprocessing.start_processes(shard_worker, args=(2, cfg, port, str(tmp_path / "seen.pt")), nprocs=2,
                                          start_method="fork")
    ranks = torch.load(tmp_path / "seen.pt", weights_only=False)
    splits = build_datasets("cifar10", str(cifar10 / "c10"), augment=False)
    train = sorted(splits.train[i][0].numpy().tobytes() for i in range(20))
    val = sorted(splits.val[i][0].numpy().tobytes() for i in range(7))
    for epoch in ("train0", "train1"):
        assert len(ranks[0][epoch]) == len(ranks[1][epoch]) == 10  # 20 samples, batches of 2 per process
        assert sorted(ranks[0][epoch] + ranks[1][epoch]) == train  # each sample exactly once
    assert ranks[0]["train0"] != ranks[0]["train1"]  # reshuffled per epoch
    assert (len(ranks[0]["val"]), len(ranks[1]["val"])) == (4, 3)
    assert sorted(ranks[0]["val"] + ranks[1]["val"]) == val  # no padding: exact evaluation counts


# --- writing is atomic, bad input exits 2 -----------------------------------------------------------------


def test_interrupted_write_leaves_no_beton(tmp_path, monkeypatch):
    from harness.data import ffcv as harness_ffcv

    write_cifar10(tmp_path / "c10", per_batch=4, test=7, seed=0)

    class Interrupted:
        def __init__(self, path, fields, num_workers):
            self.path = Path(path)

        def from_indexed_dataset(self, records, chunksize):
            self.path.write_bytes(b"half a beton")
            raise KeyboardInterrupt

    monkeypatch.setattr(harness_ffcv, "DatasetWriter", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        harness_ffcv.write_beton("cifar10", str(tmp_path / "c10"), "train", tmp_path / "out.beton")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c10"]


def run_harness(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([HARNESS, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_bad_files_roots_and_names_exit_2_naming_the_problem(cifar10, monkeypatch, capsys):
    whole = (cifar10 / "c10_train.beton").read_bytes()
    (cifar10 / "cut.beton").write_bytes(whole[: len(whole) * 2 // 3])
    (cifar10 / "junk.beton").write_bytes(b"not a beton at all" * 10)
    (cifar10 / "empty_root").mkdir()
    bench = ["bench", "loader", "--dataset", "cifar10", "--loader", "ffcv", "--out-dir", str(cifar10 / "bench")]
    cases = [
        ([*bench, "--beton", str(cifar10 / "cut.beton")], ["cut.beton", "truncated"]),
        ([*bench, "--beton", str(cifar10 / "junk.beton")], ["junk.beton", "not a readable .beton"]),
        (["data", "write-ffcv", "--dataset", "cifar10", "--root", str(cifar10 / "empty_root"), "--split", "train",
          "--out", str(cifar10 / "x.beton")], ["empty_root", "cifar-10-batches-py"]),
        (["data", "write-ffcv", "--dataset", "cifar11", "--root", str(cifar10), "--split", "train",
          "--out", str(cifar10 / "x.beton")], ["cifar11", "allowed: cifar10, cifar100, imagenet, dvs_cifar10"]),
    ]
    result = run_harness(*cases[0][0], cwd=cifar10)  # the installed command, once
    assert result.returncode == 2 and all(n in result.stderr for n in cases[0][1]), result.stderr
    for args, needles in cases:  # the same entry point in this process (a subprocess costs seconds of imports)
        monkeypatch.setattr(sys, "argv", ["harness", *args])
        with pytest.raises(SystemExit) as exit_info:
            run()
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert exit_info.value.code == 2 and line.startswith("error: ") and all(n in line for n in needles), line
    assert not (cifar10 / "x.beton").exists()


def test_a_beton_of_another_dataset_is_refused(cifar10, tmp_path):
    from harness.data import DataError

    with pytest.raises(DataError, match=r"c10_val.beton: holds fields \(image: RGBImageField, label: IntField\); "
                                        r"a dvs_cifar10 .beton holds \(frames: NDArrayField"):
        FfcvLoader(cifar10 / "c10_val.beton", "dvs_cifar10", 2, 1, 0, frames=4)


def test_bench_loader_writes_steady_state_json(cifar10):
    result = CliRunner().invoke(main, ["bench", "loader", "--dataset", "cifar10", "--loader", "ffcv", "--beton",
                                       str(cifar10 / "c10_train.beton"), "--batch-size", "4", "--warmup", "2",
                                       "--batches", "8", "--workers", "1", "--out-dir", str(cifar10 / "bench")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    import json

    saved = json.loads(next((cifar10 / "bench").glob("loader-cifar10-ffcv-train-*.json")).read_text())
    assert saved["samples"] == 32 and saved["images_per_s"] > 0 and saved["batch_x_shape"] == [4, 3, 32, 32]
