"""DVS-CIFAR10 from event files written as the original release ships them (jAER AEDAT 2.0, DVS128
addresses, big-endian): tonic reads them, frames are binned by event count and resized, the split is
per class by sample number, the crop is shared by all frames, FFCV yields the same frames, and the recipe
seam (data.frames = method.T) holds."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

pytest.importorskip("tonic", reason="tonic is not installed (pip install tonic)")

from harness.data import DataError, build_datasets, build_pipeline  # noqa: E402
from harness.data.dvs import CLASSES, read_events  # noqa: E402
from harness.recipe import DataConfig, RecipeError, load_recipe  # noqa: E402

AEDAT2_HEADER = (b"#!AER-DAT2.0\r\n# This is a raw AE data file - do not edit\r\n"
                 b"# Data format is int32 address, int32 timestamp (8 bytes total), repeated for each event\r\n"
                 b"# Timestamps tick is 1 us\r\n")
FRAMES = 4


def write_aedat2(path: Path, x: np.ndarray, y: np.ndarray, t: np.ndarray, p: np.ndarray) -> None:
    """Events as jAER's DVS128 writes them: address `y << 8 | (127 - x) << 1 | (1 - p)`, then timestamp."""
    address = (y.astype(np.uint32) << 8) | ((127 - x).astype(np.uint32) << 1) | (1 - p).astype(np.uint32)
    events = np.empty(len(x), dtype=[("address", ">u4"), ("timestamp", ">u4")])
    events["address"], events["timestamp"] = address, t
    path.write_bytes(AEDAT2_HEADER + events.tobytes())


def write_dvs_cifar10(root: Path, per_class: int = 10, events: int = 240, seed: int = 0) -> dict[Path, tuple]:
    """Class folders of `per_class` recordings each, numbered 0.. (written out of order); returns the events."""
    rng = np.random.default_rng(seed)
    written = {}
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for number in rng.permutation(per_class):
            x, y = rng.integers(0, 128, events), rng.integers(0, 128, events)
            p, t = rng.integers(0, 2, events), np.sort(rng.integers(0, 10**6, events))
            path = root / name / f"cifar10_{name}_{number}.aedat"
            write_aedat2(path, x, y, t, p)
            written[path] = (x, y, t, p)
    return written


def expected_frames(x, y, p, frames: int) -> torch.Tensor:
    """Equal-count slices counted per (polarity, y, x), resized to 48x48: the binning, computed directly."""
    counts = np.zeros((frames, 2, 128, 128), dtype=np.float32)
    per_slice = len(x) // frames
    for step in range(frames):
        part = slice(step * per_slice, (step + 1) * per_slice)
        np.add.at(counts[step], (p[part], y[part], x[part]), 1)
    return v2.functional.resize(torch.from_numpy(counts), [48, 48], antialias=True)


@pytest.fixture(scope="module")
def dvs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dvs")
    return root, write_dvs_cifar10(root)


def test_events_decode_bin_and_split_as_dsr_uses_them(dvs_root):
    root, written = dvs_root
    path = root / "cat" / "cifar10_cat_3.aedat"
    x, y, t, p = written[path]
    events = read_events(path)
    assert np.array_equal(events["x"], x) and np.array_equal(events["y"], y)
    assert np.array_equal(events["t"], t) and np.array_equal(events["p"], p.astype(bool))
    splits = build_datasets("dvs_cifar10", str(root), augment=False, frames=FRAMES)
    assert (len(splits.train), len(splits.val), splits.num_classes) == (90, 10, 10)
    assert splits.input_shape == (FRAMES, 2, 48, 48)
    # per class: samples 0-8 (9/10) train, 9 test, ordered by the number in the name
    assert [f.name for f in splits.train.files[27:36]] == [f"cifar10_cat_{n}.aedat" for n in range(9)]
    assert splits.val.files[3].name == "cifar10_cat_9.aedat" and splits.val.targets[3] == CLASSES.index("cat")
    frames, label = splits.train[27 + 3]
    assert frames.dtype == torch.float32 and frames.shape == (FRAMES, 2, 48, 48) and label == 3
    torch.testing.assert_close(frames, expected_frames(x, y, p, FRAMES))


def test_training_crop_is_one_offset_for_all_frames(dvs_root):
    root, _ = dvs_root
    plain = build_datasets("dvs_cifar10", str(root), augment=False, frames=FRAMES).train
    augmented = build_datasets("dvs_cifar10", str(root), augment=True, frames=FRAMES).train
    torch.manual_seed(0)
    offsets = set()
    for index in range(6):
        padded = torch.nn.functional.pad(plain[index][0], (4, 4, 4, 4))
        crop = augmented[index][0]
        matches = [(top, left) for top in range(9) for left in range(9)
                   if torch.equal(padded[..., top:top + 48, left:left + 48], crop)]
        assert matches, "every frame must be cut from the same window of the padded sample"
        offsets.update(matches)
    assert len(offsets) > 1


@pytest.mark.slow
def test_ffcv_frames_equal_the_torch_frames(dvs_root, tmp_path):
    pytest.importorskip("ffcv", reason="ffcv is not installed")
    from click.testing import CliRunner

    from harness.cli import main
    from harness.data.ffcv import FfcvLoader

    root, _ = dvs_root
    for split in ("train", "val"):
        result = CliRunner().invoke(main, ["data", "write-ffcv", "--dataset", "dvs_cifar10", "--root", str(root),
                                           "--split", split, "--frames", str(FRAMES),
                                           "--out", str(tmp_path / f"{split}.beton")], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    splits = build_datasets("dvs_cifar10", str(root), augment=False, frames=FRAMES)
    val = FfcvLoader(tmp_path / "val.beton", "dvs_cifar10", 4, 1, 0, train=False, frames=FRAMES)
    x, y = (torch.cat(parts) for parts in zip(*val, strict=True))
    assert x.dtype == torch.float32 and x.shape == (10, FRAMES, 2, 48, 48) and y.dtype == torch.int64
    assert torch.equal(x, torch.stack([splits.val[i][0] for i in range(10)]))
    assert y.tolist() == splits.val.targets
    cfg = DataConfig(dataset="dvs_cifar10", loader="ffcv", train=str(tmp_path / "train.beton"),
                     val=str(tmp_path / "val.beton"), frames=FRAMES, batch_size=8)
    pipeline = build_pipeline(cfg, seed=0)
    assert pipeline.input_shape == (FRAMES, 2, 48, 48) and pipeline.kind == "ffcv"
    originals = torch.stack([splits.train[i][0] for i in range(90)])
    padded = torch.nn.functional.pad(originals, (4, 4, 4, 4))
    crops, labels = next(iter(pipeline.train))
    targets = torch.tensor(splits.train.targets)
    for crop, label in zip(crops[:3], labels[:3], strict=True):  # RandomFrameCrop: one window of a padded sample
        same_class = padded[targets == label]
        windows = torch.stack([same_class[..., top:top + 48, left:left + 48] for top in range(9) for left in range(9)])
        assert ((windows - crop).abs().flatten(2).amax(-1) == 0).any()
    with pytest.raises(DataError, match=r"val.beton: frames float32 \(4, 2, 48, 48\); data.frames 5"):
        FfcvLoader(tmp_path / "val.beton", "dvs_cifar10", 4, 1, 0, train=False, frames=5)


def test_dsr_model_takes_a_batch_as_a_sequence(dvs_root):
    from harness import methods

    root, _ = dvs_root
    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "dvs_cifar10_vgg11_dsr_if_T20.yaml",
                         [f"data.root={root}", "data.frames=2", "method.T=2", "data.batch_size=2"])
    pipeline = build_pipeline(recipe.data, seed=0)
    assert pipeline.kind == "torch" and pipeline.input_shape == (2, 2, 48, 48)
    method = methods.build(recipe.model, recipe.method, methods.DataInfo(pipeline.num_classes, pipeline.input_shape))
    x, y = next(iter(pipeline.train))
    loss, logits = method.forward_loss(x, y)
    assert x.shape == (2, 2, 2, 48, 48) and logits.shape == (2, 10) and torch.isfinite(loss)


def test_recipes_hold_dsr_settings_and_frames_must_equal_T(tmp_path):
    recipes = Path(__file__).parents[1] / "recipes"
    for neuron, (vth, alpha) in {"if": (6.0, 0.5), "lif": (0.3, 0.3)}.items():
        recipe = load_recipe(recipes / f"dvs_cifar10_vgg11_dsr_{neuron}_T20.yaml")
        assert (recipe.data.dataset, recipe.data.frames, recipe.T, recipe.model.backbone) == (
            "dvs_cifar10", 20, 20, "vgg11_dvs")
        assert (recipe.method.neuron, recipe.method.vth.init, recipe.method.alpha) == (neuron, vth, alpha)
        assert (recipe.optim.lr, recipe.optim.epochs, recipe.data.batch_size, recipe.optim.weight_decay) == (
            0.05, 300, 128, 5e-4)
    with pytest.raises(RecipeError, match=r"data.frames: must equal method.T \(20\).*got 10"):
        load_recipe(recipes / "dvs_cifar10_vgg11_dsr_if_T20.yaml", ["data.frames=10"])
    with pytest.raises(DataError, match="dvs_cifar10 .*needs data.frames"):
        build_pipeline(DataConfig(dataset="dvs_cifar10", root=str(tmp_path)), seed=0)
    with pytest.raises(DataError, match="data.frames: 4 set, but dataset 'digits' is not an event data set"):
        build_pipeline(DataConfig(dataset="digits", frames=4), seed=0)


def test_bad_event_files_and_layouts_are_named(tmp_path):
    with pytest.raises(DataError, match=r"missing class folders airplane, automobile"):
        build_datasets("dvs_cifar10", str(tmp_path), frames=2)
    write_dvs_cifar10(tmp_path, per_class=2, events=8)
    broken = tmp_path / "dog" / "cifar10_dog_1.aedat"
    broken.write_bytes(b"\x00\x01\x02")
    splits = build_datasets("dvs_cifar10", str(tmp_path), augment=False, frames=2)
    assert splits.train.files[2 * CLASSES.index("dog") + 1] == broken
    with pytest.raises(DataError, match=r"cifar10_dog_1.aedat: "):
        splits.train[2 * CLASSES.index("dog") + 1]
    (tmp_path / "dog" / "notes_x.aedat").write_bytes(AEDAT2_HEADER)
    with pytest.raises(DataError, match=r"notes_x.aedat: name does not end with a sample number"):
        build_datasets("dvs_cifar10", str(tmp_path), frames=2)
