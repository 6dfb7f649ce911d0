"""utils/unet.py and run_unet.py (tiny preset: kernels 4..64, 1 epoch, batch 8, 2 U-Nets: augmentation on/off)."""

import json

import numpy as np
import pytest
import torch

import config
import run_unet
import utils.unet as unet_module
from model import UNet
from utils.common import file_sha256, minmax_scale, patches_path, save_json, save_npz, synthetic_path, unet_dir
from utils.unet import (
    augment,
    grid,
    load_unet,
    predict_patches,
    prepare_input,
    run_name,
    soft_dice_loss,
    standardisation,
    train_unet,
    warp,
)

N = 8  # one U-Net = 2 N / batch = 2 steps


def blob_patches(n, seed=0, scale=1000.0):
    """Smooth bright blobs on a dark background (raw intensities) and their vessel-like label (blob > half)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:96, 0:96]
    img = np.zeros((n, 96, 96), np.float32)
    for i in range(n):
        for _ in range(4):
            cx, cy = rng.uniform(12, 84, 2)
            width = rng.uniform(4, 10)
            img[i] += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * width ** 2))
    img = scale * img / img.max(axis=(1, 2), keepdims=True)
    label = (img > scale / 2).astype(np.uint8)
    return img + rng.normal(0, scale / 100, img.shape).astype(np.float32), label


def write_real(n=N, **overrides):
    img, label = blob_patches(n)
    arrays = {"img": img, "label": label, "patient": np.array(["train_000"] * n), "skull_stripped": np.array(True),
              **overrides}
    save_npz(patches_path("train"), **arrays)
    return img, label


def write_synthetic(img, label, skull_stripped=True):
    """A synthetic set DP_G_3_0.8 and the information file generate_samples.py writes beside it."""
    path = synthetic_path("G", 3, 0.8)
    save_npz(path, img=minmax_scale(img, 0, 255)[..., None], label=label[..., None])
    save_json(path.with_suffix(".json"), {"trial": "G", "epoch": 3, "skull_stripped": skull_stripped})
    return path


def train(*args):
    return run_unet.main(list(args))


def test_unet_maps_a_patch_to_probabilities_for_the_paper_kernels():
    model = UNet(kernels=(32, 64, 128, 256, 512), dropout=0.1).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 96, 96))
    assert out.shape == (1, 1, 96, 96)
    assert ((out > 0) & (out < 1)).all()


def test_grid_and_run_names(monkeypatch):
    monkeypatch.setattr(config, "UNET_LEARNING_RATES", (1e-4, 8e-5))
    monkeypatch.setattr(config, "UNET_DROPOUTS", (0.0, 0.1))
    monkeypatch.setattr(config, "UNET_AUGMENTATION", (True, False))
    runs = grid()
    assert len(runs) == 8 and len({run_name(r) for r in runs}) == 8
    assert runs[0] == {"lr": 1e-4, "dropout": 0.0, "augmentation": True}
    assert run_name(runs[-1]) == "lr8e-05_do0.1_aug0"


def test_soft_dice_loss_on_hand_made_cases():
    ones = torch.ones(2, 1, 4, 4)
    zeros = torch.zeros(2, 1, 4, 4)
    assert soft_dice_loss(ones, ones).item() == pytest.approx(-1.0)  # (2*32+1)/(64+1)
    assert soft_dice_loss(zeros, zeros).item() == pytest.approx(-1.0)  # smoothing: 1/1
    target = torch.zeros(1, 1, 2, 2)
    target[0, 0, 0, 0] = 1
    assert soft_dice_loss(torch.zeros(1, 1, 2, 2), ones[:1, :, :2, :2]).item() == pytest.approx(-1 / 5)
    assert soft_dice_loss(torch.full((1, 1, 2, 2), 0.5), target).item() == pytest.approx(-(1 + 1) / (2 + 1 + 1))
    # over the flattened batch, not a mean of per-sample values
    pred = torch.stack([ones[0], zeros[0]])
    truth = torch.stack([ones[0], ones[0]])
    assert soft_dice_loss(pred, truth).item() == pytest.approx(-(2 * 16 + 1) / (16 + 32 + 1))


def test_prepare_input_scales_per_patch_and_standardises():
    img, _ = blob_patches(3)
    img[1] = img[1] * 5 + 300  # a different intensity range gives the same input
    out = prepare_input(img, 100.0, 50.0)
    assert out.shape == (3, 1, 96, 96) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0], (minmax_scale(img, 0, 255) - 100) / 50, atol=1e-5)
    np.testing.assert_allclose(out.min(axis=(1, 2, 3)), -2.0, atol=1e-5)
    np.testing.assert_allclose(out.max(axis=(1, 2, 3)), (255 - 100) / 50, atol=1e-5)
    as_torch = prepare_input(torch.from_numpy(img), 100.0, 50.0)
    assert isinstance(as_torch, torch.Tensor)
    np.testing.assert_allclose(as_torch.numpy(), out, atol=1e-6)
    mean, sd = standardisation(img)
    scaled = minmax_scale(img, 0, 255).astype(np.float64)
    assert mean == pytest.approx(scaled.mean()) and sd == pytest.approx(scaled.std(), rel=1e-6)


def test_augmentation_keeps_image_and_label_aligned_and_binary():
    img, _ = blob_patches(32, seed=1, scale=255.0)
    img = minmax_scale(img, 0, 255)
    label = (img > 100).astype(np.float32)
    x, y = torch.from_numpy(img)[:, None], torch.from_numpy(label)[:, None]
    torch.manual_seed(0)
    xa, ya = augment(x, y, 0.0)
    assert set(torch.unique(ya).tolist()) <= {0.0, 1.0}
    agreement = ((xa > 100).float() == ya).float().mean(dim=(1, 2, 3))
    assert agreement.min() > 0.98, agreement.min()  # disagreement only on the contour of interpolation
    assert (xa - x).abs().mean() > 5  # it really transformed the images
    assert xa.shape == x.shape and ya.shape == y.shape


def test_warp_identity_flip_and_fill():
    img, label = blob_patches(4)
    x, y = torch.from_numpy(img)[:, None], torch.from_numpy(label.astype(np.float32))[:, None]
    identity = torch.tensor([[1.0, 0, 0], [0, 1, 0]]).repeat(4, 1, 1)
    xi, yi = warp(x, y, identity, fill=-3.0)
    torch.testing.assert_close(xi, x, atol=1e-3, rtol=0)
    torch.testing.assert_close(yi, y)
    flip = torch.tensor([[1.0, 0, 0], [0, -1, 0]]).repeat(4, 1, 1)
    xf, yf = warp(x, y, flip, fill=-3.0)
    torch.testing.assert_close(xf, torch.flip(x, dims=[2]), atol=1e-3, rtol=0)  # up-down: the rows
    torch.testing.assert_close(yf, torch.flip(y, dims=[2]))
    shrink = torch.tensor([[2.0, 0, 0], [0, 2, 0]]).repeat(4, 1, 1)  # samples outside the input at the border
    xs, ys = warp(x, y, shrink, fill=-3.0)
    assert (xs[:, :, 0, 0] == -3.0).all() and (ys[:, :, 0, 0] == 0).all()


def test_augmentation_off_is_identity_on_changes_the_batches(monkeypatch):
    img, label = blob_patches(8)
    images = torch.from_numpy(prepare_input(img, 100.0, 50.0))
    labels = torch.from_numpy(label[:, None])
    seen = []

    def recording_forward(self, x):  # records the training batches (not the check); cheap and differentiable
        if torch.is_grad_enabled():
            seen.append(x.detach().clone())
        return torch.sigmoid(x * self.head.weight.sum())

    monkeypatch.setattr(UNet, "forward", recording_forward)
    monkeypatch.setattr(config, "UNET_EPOCHS", 1)
    for augmentation in (False, True):
        seen.clear()
        train_unet(images, labels, {"lr": 1e-3, "dropout": 0.0, "augmentation": augmentation}, 100.0, 50.0, 0)
        batches = torch.cat(seen)
        assert len(batches) == 2 * len(images)  # 2 N / batch steps of `batch` samples
        matches = [any(torch.equal(b, i) for i in images) for b in batches]
        assert all(matches) if not augmentation else not any(matches)


def test_a_tiny_unet_learns(monkeypatch):
    img, _ = blob_patches(8, seed=2)
    label = (img > 250).astype(np.uint8)  # about 16 % vessel: a plain threshold the U-Net can learn
    mean, sd = standardisation(img)
    images = torch.from_numpy(prepare_input(img, mean, sd))
    labels = torch.from_numpy(label[:, None])
    monkeypatch.setattr(config, "UNET_EPOCHS", 6)  # 12 steps
    _, history = train_unet(images, labels, {"lr": 3e-3, "dropout": 0.0, "augmentation": False}, mean, sd, 0)
    losses = [row["loss"] for row in history]
    assert losses[-1] < losses[0] - 0.05, losses
    assert history[-1]["collapsed"] == 0 and history[-1]["predicted_per_true_vessel"] > 0.5


def test_run_unet_on_real_patches_writes_models_and_skips_existing(dirs, capsys):
    _, work, _ = dirs
    img, label = write_real()
    train("--real", "--device", "cpu")
    folder = unet_dir("real")
    runs = [folder / run_name(params) for params in grid()]
    assert len(runs) == 2 and {p.name for p in folder.iterdir()} == {"lr0.001_do0_aug1", "lr0.001_do0_aug0"}
    mean, sd = standardisation(img)
    for run_dir in runs:
        meta = json.loads((run_dir / "meta.json").read_text())
        saved = torch.load(run_dir / "model.pt", weights_only=True)
        assert meta["mean"] == pytest.approx(mean) and meta["sd"] == pytest.approx(sd)
        assert saved["mean"] == pytest.approx(mean) and saved["sd"] == pytest.approx(sd)
        assert {"lr", "dropout", "augmentation", "epochs", "batch_size", "kernels", "train_input", "n_train",
                "seconds"} <= set(meta)
        assert meta["collapsed_seeds"] == [] and meta["seed"] in (config.UNET_SEED, config.UNET_SEED + 1)
        assert (meta["n_train"], meta["train_input"], meta["kernels"]) == (N, "real", list(config.UNET_KERNELS))
        lines = (run_dir / "history.csv").read_text().splitlines()
        assert lines[0] == "seed,epoch,loss,predicted_per_true_vessel,collapsed,seconds"
        assert len(lines) == 1 + config.UNET_EPOCHS
        model, loaded = load_unet(run_dir, "cpu")
        assert not model.training and loaded["mean"] == pytest.approx(mean)
        probs = predict_patches(model, img[:5], loaded, "cpu", batch_size=2)
        assert probs.shape == (5, 96, 96) and probs.dtype == np.float32 and ((probs >= 0) & (probs <= 1)).all()
    stamps = [(r / "model.pt").stat().st_mtime_ns for r in runs]
    capsys.readouterr()
    train("--real")
    out = capsys.readouterr().out
    assert out.count("skipped") == 2
    assert [(r / "model.pt").stat().st_mtime_ns for r in runs] == stamps
    (runs[1] / "model.pt").unlink()  # an unfinished run is trained again, the finished one is not
    train("--real")
    assert capsys.readouterr().out.count("skipped") == 1
    assert (runs[0] / "model.pt").stat().st_mtime_ns == stamps[0]
    first = torch.load(runs[0] / "model.pt", weights_only=True)["state_dict"]
    train("--real", "--overwrite")
    assert (runs[0] / "model.pt").stat().st_mtime_ns != stamps[0]
    again = torch.load(runs[0] / "model.pt", weights_only=True)["state_dict"]
    for key in first:  # seeded: retraining gives the same weights
        torch.testing.assert_close(first[key], again[key])


def test_run_unet_on_a_synthetic_set(dirs, monkeypatch):
    monkeypatch.setattr(config, "UNET_AUGMENTATION", (False,))
    img, label = blob_patches(N)
    write_synthetic(img, label)
    train("--trial", "G", "--epoch", "3", "--thresh", "0.8")
    meta = json.loads((unet_dir("DP_G_3_0.8") / "lr0.001_do0_aug0" / "meta.json").read_text())
    assert meta["train_input"] == "DP_G_3_0.8" and meta["n_train"] == N and meta["skull_stripped"] is True


def test_unets_of_a_regenerated_set_are_refused_and_overwrite_retrains(dirs, monkeypatch, capsys):
    monkeypatch.setattr(config, "UNET_AUGMENTATION", (False,))
    img, label = blob_patches(N)
    path = write_synthetic(img, label)
    train("--trial", "G", "--epoch", "3", "--thresh", "0.8")
    model = unet_dir("DP_G_3_0.8") / "lr0.001_do0_aug0" / "model.pt"
    stamp = model.stat().st_mtime_ns
    save_npz(path, img=minmax_scale(img[::-1], 0, 255)[..., None], label=label[::-1, ..., None])  # regenerated
    err = expect_error(capsys, "--trial", "G", "--epoch", "3", "--thresh", "0.8")
    assert str(model) in err and str(path) in err and "--overwrite" in err
    assert model.stat().st_mtime_ns == stamp
    train("--trial", "G", "--epoch", "3", "--thresh", "0.8", "--overwrite")
    meta = json.loads((model.parent / "meta.json").read_text())
    assert meta["train_sha256"] == file_sha256(path) and model.stat().st_mtime_ns != stamp


def expect_error(capsys, *args):
    with pytest.raises(SystemExit) as exit_:
        train(*args)
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_missing_synthetic_set_names_the_command(dirs, capsys):
    err = expect_error(capsys, "--trial", "G", "--epoch", "9999", "--thresh", "0.8")
    assert "gen_patches_DP_G_9999_0.8.npz" in err
    assert "python generate_samples.py --trial G --epoch 9999 --thresh 0.8" in err
    assert "either --real or --trial" in expect_error(capsys, "--real", "--trial", "G", "--epoch", "1")
    assert "either --real or --trial" in expect_error(capsys)
    assert "extract_patches.py" in expect_error(capsys, "--real")


@pytest.mark.parametrize("overrides, message", [
    ({"img": None}, "lacks the arrays ['img']"),
    ({"img": np.zeros((N, 64, 64), np.float32)}, "shape (8, 64, 64)"),
    ({"label": np.full((N, 96, 96), 2, np.uint8)}, "not binary"),
    ({"label": np.zeros((N - 1, 96, 96), np.uint8)}, "8 images but 7 labels"),
    ({"img": np.full((N, 96, 96), np.nan, np.float32)}, "not finite"),
])
def test_malformed_patches_are_refused(dirs, capsys, overrides, message):
    _, work, _ = dirs
    img, label = blob_patches(N)
    arrays = {"img": img, "label": label, **overrides}
    save_npz(patches_path("train"), **{k: v for k, v in arrays.items() if v is not None})
    err = expect_error(capsys, "--real")
    assert message in err and str(patches_path("train")) in err
    assert not (work / "unets").exists()


@pytest.mark.parametrize("real", [True, False])
def test_training_patches_prepared_otherwise_than_the_volumes_are_read_are_refused_before_training(dirs, capsys,
                                                                                                   monkeypatch, real):
    """A U-Net learns what the volumes it will predict look like: patches cut from raw scans (or a GAN trained on
    them) cannot teach a U-Net that predicts skull-stripped volumes, and the other way round."""
    _, work, _ = dirs
    img, label = blob_patches(N)
    if real:
        write_real(skull_stripped=np.array(False))
        path, flags = patches_path("train"), ["--real"]
    else:
        path, flags = write_synthetic(img, label, skull_stripped=False), ["--trial", "G", "--epoch", "3", "--thresh",
                                                                          "0.8"]
    err = expect_error(capsys, *flags)
    assert f"training set {path} was made from raw (not skull-stripped) volumes" in err
    assert "config.SKULL_STRIP is True" in err and not (work / "unets").exists()
    monkeypatch.setattr(config, "SKULL_STRIP", False)
    monkeypatch.setattr(config, "UNET_AUGMENTATION", (False,))
    train(*flags)
    meta = json.loads(next((work / "unets").glob("*/*/meta.json")).read_text())
    assert meta["skull_stripped"] is False


def test_unet_starts_as_the_authors_keras_unet_glorot_uniform_weights_and_zero_biases():
    torch.manual_seed(0)
    convs = [m for m in UNet(kernels=(32, 64, 128, 256, 512)).modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 9 * 2 + 1  # two per level down (5) and up (4), and the 1 x 1 head
    for conv in convs:
        receptive = conv.kernel_size[0] * conv.kernel_size[1]
        limit = (6 / (receptive * (conv.in_channels + conv.out_channels))) ** 0.5
        assert (conv.bias == 0).all()
        assert conv.weight.abs().max() <= limit
        if conv.weight.numel() >= 10_000:  # U(-limit, limit) has SD limit / sqrt 3 (PyTorch's default: 1 / 3 of it)
            assert conv.weight.std().item() == pytest.approx(limit / 3 ** 0.5, rel=0.05)


def test_history_flags_a_unet_that_predicts_no_vessel_as_collapsed(monkeypatch):
    img, label = blob_patches(N)
    images, labels = torch.from_numpy(prepare_input(img, 100.0, 50.0)), torch.from_numpy(label[:, None])
    params = {"lr": 1e-3, "dropout": 0.0, "augmentation": False}
    monkeypatch.setattr(config, "UNET_EPOCHS", 2)
    monkeypatch.setattr(config, "UNET_START_AT_PRIOR", False)  # from p = 0.5 four steps leave pixels above 0.5
    _, history = train_unet(images, labels, params, 100.0, 50.0, 0)
    assert [row["collapsed"] for row in history] == [0, 0]
    assert all(row["predicted_per_true_vessel"] > 0.1 for row in history)

    def saturated_at_zero(self, x):  # a collapsed U-Net: the sigmoid is 0 on every pixel
        return torch.sigmoid(x * 0 + self.head.bias.sum() * 0 - 30)

    monkeypatch.setattr(UNet, "forward", saturated_at_zero)
    _, history = train_unet(images, labels, params, 100.0, 50.0, 0)
    assert [(row["collapsed"], row["predicted_per_true_vessel"]) for row in history] == [(1, 0.0), (1, 0.0)]
    # asked to, it stops after the first collapsed epoch: the all-zero output is where it would stay
    _, history = train_unet(images, labels, params, 100.0, 50.0, 0, stop_if_collapsed=True)
    assert [(row["seed"], row["epoch"], row["collapsed"]) for row in history] == [(0, 0, 1)]


def saturated_for_seeds(monkeypatch, seeds):
    """U-Nets trained with one of `seeds` collapse (sigmoid 0 on every pixel); the others train as they do."""
    forward, real_train = UNet.forward, unet_module.train_unet

    def train_unet_(images, labels, params, mean, sd, seed, **kwargs):
        if seed in seeds:
            monkeypatch.setattr(UNet, "forward", lambda self, x: torch.sigmoid(forward(self, x) * 0 - 30))
        try:
            return real_train(images, labels, params, mean, sd, seed, **kwargs)
        finally:
            monkeypatch.setattr(UNet, "forward", forward)

    monkeypatch.setattr(unet_module, "train_unet", train_unet_)


def retries_on(monkeypatch, retries):
    """Two epochs of U-Nets that predict vessel unless made to collapse (from p = 0.5, four steps leave pixels
    above 0.5) and `retries` retries."""
    monkeypatch.setattr(config, "UNET_EPOCHS", 2)
    monkeypatch.setattr(config, "UNET_START_AT_PRIOR", False)
    monkeypatch.setattr(config, "UNET_COLLAPSE_RETRIES", retries)


def test_a_unet_that_collapses_is_trained_again_with_another_seed(dirs, monkeypatch, capsys):
    write_real()
    retries_on(monkeypatch, 2)
    first = config.UNET_SEED  # the grid's first U-Net; the grid has two, so its retry takes seed first + 2
    saturated_for_seeds(monkeypatch, {first})
    train("--real", "--device", "cpu")
    run_dir = unet_dir("real") / run_name(grid()[0])
    meta = json.loads((run_dir / "meta.json").read_text())
    assert (meta["seed"], meta["collapsed_seeds"], meta["collapsed"]) == (first + 2, [first], False)
    history = (run_dir / "history.csv").read_text().splitlines()[1:]
    # the collapsed attempt stopped after its first epoch; the retry trained every epoch and did not collapse
    assert [tuple(line.split(",")[i] for i in (0, 1, 4)) for line in history] == [
        (str(first), "0", "1"), (str(first + 2), "0", "0"), (str(first + 2), "1", "0")]
    assert f"seed {first} collapsed after epoch 0" in capsys.readouterr().out
    other = json.loads((unet_dir("real") / run_name(grid()[1]) / "meta.json").read_text())
    assert (other["seed"], other["collapsed_seeds"]) == (first + 1, [])  # the other U-Net of the grid: untouched


def test_a_unet_that_collapses_with_every_seed_is_kept_and_flagged(dirs, monkeypatch):
    write_real()
    retries_on(monkeypatch, 1)
    first = config.UNET_SEED
    saturated_for_seeds(monkeypatch, {first, first + 2})
    train("--real", "--device", "cpu")
    run_dir = unet_dir("real") / run_name(grid()[0])
    meta = json.loads((run_dir / "meta.json").read_text())
    assert (meta["seed"], meta["collapsed_seeds"], meta["collapsed"]) == (first + 2, [first], True)
    assert (run_dir / "model.pt").is_file()  # kept: evaluation names it and never selects it while another exists
    history = (run_dir / "history.csv").read_text().splitlines()[1:]
    assert [line.split(",")[:2] for line in history] == [[str(first), "0"], [str(first + 2), "0"],
                                                         [str(first + 2), "1"]]  # the last attempt runs to its end


@pytest.mark.parametrize("start_at_prior", [True, False])
def test_the_unet_starts_at_the_vessel_fraction_of_its_training_labels(monkeypatch, start_at_prior):
    img, label = blob_patches(N)
    images, labels = torch.from_numpy(prepare_input(img, 100.0, 50.0)), torch.from_numpy(label[:, None])
    monkeypatch.setattr(config, "UNET_EPOCHS", 0)
    monkeypatch.setattr(config, "UNET_START_AT_PRIOR", start_at_prior)
    model, _ = train_unet(images, labels, {"lr": 1e-3, "dropout": 0.0, "augmentation": False}, 100.0, 50.0, 0)
    with torch.no_grad():
        mean_output = float(model(images).mean())
    fraction = float(label.mean())
    assert 0.005 < fraction < 0.2
    # From p = 0.5 on every pixel the soft Dice's first steps push all logits down together (utils/unet.py)
    assert mean_output == pytest.approx(fraction if start_at_prior else 0.5, rel=0.1)


def test_unets_another_live_run_is_training_are_refused_before_anything_is_read(dirs, capsys):
    import os
    import socket

    from utils.locks import lock_path

    lock = lock_path(unet_dir("real"))
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "now"}))
    with pytest.raises(SystemExit):
        run_unet.main(["--real"])
    assert f"the U-Nets of real is in use by process {os.getppid()}" in capsys.readouterr().err
    assert not unet_dir("real").exists()


def test_a_bad_number_of_retries_is_refused_before_training(dirs, monkeypatch, capsys):
    write_real()
    monkeypatch.setattr(config, "UNET_COLLAPSE_RETRIES", -1)
    with pytest.raises(SystemExit):
        train("--real", "--device", "cpu")
    assert "config.UNET_COLLAPSE_RETRIES is -1" in capsys.readouterr().err
    assert not any(unet_dir("real").glob("*/model.pt"))
