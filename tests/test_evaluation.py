"""Evaluation: tiling, whole-volume prediction, scores and the result files, end to end on tiny volumes."""

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

import config
import eval_unet
from model import UNet
from utils.common import (
    PipelineError,
    file_sha256,
    patches_path,
    save_json,
    save_npz,
    save_torch,
    synthetic_path,
    unet_dir,
)
from utils.evaluation import (
    brain_box_tiles,
    ensure_test_patches,
    errormap_path,
    evaluate_model_on_split,
    evaluate_training_input,
    patient_csv_path,
    predict_volume,
    prediction_path,
    result_paths,
    save_probability_map,
    score,
    summarise,
    tsne_groups,
    tsne_path,
)
from utils.unet import grid, run_name

SHAPE = (128, 128, 4)
TRIAL, EPOCH, THRESH = "T1", 3, 0.8
TRAIN_INPUT = f"DP_{TRIAL}_{EPOCH}_{THRESH}"


# ---- tiling ----
def owner_counts(mask_slice):
    """How often each voxel is written by the tiles' owned regions, and how often it lies in a tile."""
    tiles = brain_box_tiles(mask_slice)
    written = np.zeros(mask_slice.shape, int)
    covered = np.zeros(mask_slice.shape, int)
    for tile in tiles:
        assert 0 <= tile.x0 <= mask_slice.shape[0] - 96 and 0 <= tile.y0 <= mask_slice.shape[1] - 96
        assert tile.x0 <= tile.own_x.start <= tile.own_x.stop <= tile.x0 + 96
        assert tile.y0 <= tile.own_y.start <= tile.own_y.stop <= tile.y0 + 96
        written[tile.own_x, tile.own_y] += 1
        covered[tile.x0:tile.x0 + 96, tile.y0:tile.y0 + 96] += 1
    return tiles, written, covered


@pytest.mark.parametrize("shape, box, n_tiles", [
    ((240, 200), (5, 205, 10, 130), 3 * 2),  # not multiples of 96: 200 -> 3 tiles, 120 -> 2
    ((240, 200), (50, 80, 60, 70), 1),  # smaller than 96 in both directions
    ((200, 200), (150, 200, 0, 40), 1),  # small box at the far and near edges: clamped inside
    ((200, 130), (3, 200, 0, 130), 3 * 2),  # box reaching the edges: the last tiles shifted back (overlap)
    ((192, 192), (0, 192, 0, 192), 2 * 2),  # exact multiples: no overlap
    ((96, 96), (40, 41, 40, 41), 1),  # one voxel in a volume of exactly one tile
])
def test_tiles_cover_every_brain_voxel_exactly_once(shape, box, n_tiles):
    mask = np.zeros(shape, np.uint8)
    x0, x1, y0, y1 = box
    mask[x0:x1, y0:y1] = 1
    tiles, written, covered = owner_counts(mask)
    assert len(tiles) == n_tiles
    assert np.all(written[mask == 1] == 1)
    assert written.max() == 1  # no voxel written twice
    np.testing.assert_array_equal(written > 0, covered > 0)  # every voxel of a tile gets one value


def test_tiles_of_random_brains_and_errors():
    rng = np.random.default_rng(0)
    for _ in range(20):
        shape = tuple(rng.integers(96, 300, size=2))
        mask = np.zeros(shape, np.uint8)
        for _ in range(3):
            x, y = rng.integers(0, shape[0]), rng.integers(0, shape[1])
            mask[x:x + rng.integers(1, 150), y:y + rng.integers(1, 150)] = 1
        _, written, covered = owner_counts(mask)
        assert np.all(written[mask == 1] == 1) and written.max() == 1
        np.testing.assert_array_equal(written > 0, covered > 0)
    assert brain_box_tiles(np.zeros((100, 100), np.uint8)) == []
    with pytest.raises(PipelineError, match="smaller than a 96 x 96"):
        brain_box_tiles(np.ones((95, 200), np.uint8))


# ---- prediction ----
class SigmoidOfInput(nn.Module):
    """Probability = sigmoid(gain * standardised input), voxel by voxel; counts its forward passes."""

    def __init__(self, gain=4.0):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(gain))
        self.batches = []

    def forward(self, x):
        self.batches.append(len(x))
        return torch.sigmoid(self.gain * x)


def test_predict_volume_places_probabilities_at_their_voxels():
    rng = np.random.default_rng(1)
    shape = (160, 130, 5)
    img = rng.uniform(100, 900, size=shape).astype(np.float32)
    # a 0 and a 1000 in every 8 x 8 block: every tile's min-max scaling is then img * 255 / 1000
    img[::8, ::8] = 0
    img[4::8, 4::8] = 1000
    mask = np.zeros(shape, np.uint8)
    mask[10:150, 20:60, 1] = 1  # x: tiles at 10 and 64 (shifted back to the edge, overlapping); y: one at 20
    mask[100:130, 90:130, 3] = 1  # small box at the y edge: one tile at x 100 -> 64, y 90 -> 34
    meta = {"mean": 127.5, "sd": 127.5}
    model = SigmoidOfInput()
    prob = predict_volume(model, meta, img, mask, "cpu", batch_size=2)

    expected = np.zeros(shape, np.float32)
    scaled = (img * np.float32(255 / 1000) - 127.5) / 127.5
    region = np.zeros(shape, bool)
    region[10:160, 20:116, 1] = True
    region[64:160, 34:130, 3] = True
    expected[region] = 1 / (1 + np.exp(-4.0 * scaled[region]))
    np.testing.assert_allclose(prob, expected, atol=1e-5)
    assert prob.dtype == np.float32 and prob.shape == shape
    assert model.batches == [2, 1]  # 2 tiles in slice 1, 1 in slice 3: predicted together, 2 per pass


def test_predict_volume_needs_96_in_plane():
    with pytest.raises(PipelineError, match="smaller than a 96 x 96"):
        predict_volume(SigmoidOfInput(), {"mean": 0, "sd": 1}, np.zeros((90, 128, 2), np.float32),
                       np.ones((90, 128, 2), np.uint8), "cpu")


def test_dsc_in_the_brain_drops_false_vessels_outside_the_brain_mask_and_only_those():
    label = np.zeros((8, 8, 2), np.uint8)
    label[2:4, 2:4] = 1  # 8 true voxels in the brain
    mask = np.zeros_like(label)
    mask[1:7, 1:7] = 1
    prob = label.astype(np.float32)
    prob[0, :, 0] = 1.0  # 8 false vessels on the "scalp", outside the mask
    prob[2, 2, 0] = 0.0  # one missed vessel voxel in the brain
    s = score(prob, label, (1.0, 1.0, 1.0), mask)
    assert s["dsc"] == pytest.approx(2 * 7 / (15 + 8)) and s["dsc_brain"] == pytest.approx(2 * 7 / (7 + 8))
    assert "dsc_brain" not in score(prob, label, (1.0, 1.0, 1.0))


def test_summarise_counts_undefined_bahd():
    rows = [{"patient": "a", "dsc": 0.8, "bahd": 1.0, "n_pred": 9, "n_truth": 10},
            {"patient": "b", "dsc": 0.6, "bahd": 3.0, "n_pred": 5, "n_truth": 10},
            {"patient": "c", "dsc": 0.0, "bahd": math.inf, "n_pred": 0, "n_truth": 10}]
    s = summarise(rows)
    assert s["dsc_mean"] == pytest.approx(1.4 / 3) and s["dsc_sd"] == pytest.approx(np.std([0.8, 0.6, 0.0]))
    assert s["bahd_mean"] == 2.0 and s["bahd_sd"] == 1.0
    assert s["bahd_undefined"] == 1 and s["bahd_undefined_patients"] == ["c"]
    assert not s["collapsed"]  # one patient without a predicted vessel is no collapse
    assert summarise([{**row, "n_pred": 0} for row in rows])["collapsed"]
    assert summarise([{**row, "n_truth": 1000} for row in rows])["collapsed"]  # 14 voxels of 3000: almost none


# ---- end to end ----
def write_volume(folder, patient, rng):
    affine = np.diag([0.5, 0.5, 0.7, 1.0])
    mask = np.zeros(SHAPE, np.uint8)
    mask[10:120, 20:110, 1:] = 1  # slice 0 has no brain
    label = np.zeros(SHAPE, np.uint8)
    label[60:63, 20:110, 1:] = 1
    img = rng.uniform(100, 300, size=SHAPE).astype(np.float32)
    img[label == 1] = 800
    folder.mkdir(parents=True, exist_ok=True)
    for kind, array in (("img", img), ("label", label), ("mask", mask)):
        nib.save(nib.Nifti1Image(array, affine), folder / f"{patient}_{kind}.nii.gz")


def write_patches(split, n, rng):
    img = rng.uniform(0, 1000, size=(n, 96, 96)).astype(np.float32)
    label = (rng.random((n, 96, 96)) < 0.05).astype(np.uint8)
    save_npz(patches_path(split), img=img, label=label, patient=np.array([f"{split}_000"] * n),
             centre=np.full((n, 3), 48, np.int32), skull_stripped=np.array(True))


def write_synthetic(trial, epsilon, rng, n=30):
    path = synthetic_path(trial, EPOCH, THRESH)
    save_npz(path, img=rng.uniform(0, 255, size=(n, 96, 96, 1)).astype(np.float32),
             label=(rng.random((n, 96, 96, 1)) < 0.05).astype(np.uint8))
    save_json(path.with_suffix(".json"), {"trial": trial, "epoch_requested": EPOCH, "epoch": EPOCH, "thresh": THRESH,
                                          "n_samples": n, "epsilon": epsilon, "epsilon_valid": epsilon,
                                          "noisem": 1.0, "dp_mode": "strict", "seed": 1})


def write_unets(train_input):
    data = patches_path("train") if train_input == "real" else synthetic_path(TRIAL, EPOCH, THRESH)
    for i, params in enumerate(grid()):
        torch.manual_seed(i)
        model = UNet(tuple(config.UNET_KERNELS), params["dropout"])
        run_dir = unet_dir(train_input) / run_name(params)
        save_json(run_dir / "meta.json", {**params, "epochs": 1, "batch_size": 8, "kernels": list(config.UNET_KERNELS),
                                          "mean": 120.0, "sd": 60.0, "train_input": train_input, "n_train": 30,
                                          "train_sha256": file_sha256(data), "skull_stripped": True})
        save_torch(run_dir / "model.pt", {"state_dict": model.state_dict(), "kernels": list(config.UNET_KERNELS),
                                          "dropout": params["dropout"], "mean": 120.0, "sd": 60.0})


@pytest.fixture
def workspace(dirs):
    """Tiny val/test/test2 volumes, train patches, two synthetic sets (private, non-private) and their U-Nets."""
    data, work, _ = dirs
    rng = np.random.default_rng(5)
    for split in ("val", "test", "test2"):
        for patient in config.PATIENT_IDS[split]:
            write_volume(data / split, patient, rng)
    write_patches("train", 30, rng)
    write_patches("test", 30, rng)
    write_synthetic(TRIAL, 5.2, rng)
    write_synthetic("NP", "inf", rng)
    write_unets(TRAIN_INPUT)
    return data, work


def run_eval(*flags, trial=TRIAL, missing_weights=None):
    argv = ["--device", "cpu", "--fid_weights", str(missing_weights), *flags]
    argv += ["--real"] if trial is None else ["--trial", trial, "--epoch", str(EPOCH), "--thresh", str(THRESH)]
    return eval_unet.main(argv)


def test_eval_writes_every_field(workspace, tmp_path, capsys):
    missing = tmp_path / "no_such_inception.pth"
    txt, js = result_paths(TRAIN_INPUT)
    assert run_eval(missing_weights=missing) == txt
    printed = capsys.readouterr().out
    text = txt.read_text()
    result = json.loads(js.read_text())
    assert text in printed
    assert len(text.splitlines()) == len(result)  # one line per field

    for key in ("training_input", "epsilon", "epsilon_valid", "best_unet", "best_unet_hyperparameters", "val_dsc",
                "test_dsc", "test_bahd", "test_bahd_undefined", "test2_dsc", "test2_bahd", "test2_bahd_undefined",
                "val_dsc_all_unets", "fid", "ssim_generated", "ssim_real", "evaluation_date", "config_preset"):
        assert key in result, key
    assert result["training_input"] == TRAIN_INPUT and result["epsilon"] == 5.2 and result["config_preset"] == "tiny"
    # what the rows compare: how the data were prepared and where the GAN started (the set records no public start)
    assert result["skull_stripped"].startswith("skull-stripped") and result["started_from"] == "random weights"
    assert set(result["val_dsc_all_unets"]) == {run_name(p) for p in grid()}
    assert result["best_unet"] == max(result["val_dsc_all_unets"], key=lambda k: result["val_dsc_all_unets"][k]["mean"])
    assert result["best_unet_hyperparameters"]["kernels"] == list(config.UNET_KERNELS)
    assert result["fid"].startswith("not computed: ") and str(missing.name) in result["fid"]
    assert "not computed: not computed" not in result["fid"]
    assert f"FID: {result['fid']}" in text
    assert 0 <= result["ssim_generated"] <= 1 and 0 <= result["ssim_real"] <= 1
    for label in ("training input:", "epsilon (valid bound, RDP accountant):", "best U-Net hyper-parameters:",
                  "val DSC mean (SD):", "test DSC mean (SD):", "test2 bAHD mm mean (SD)", "SSIM real train",
                  "evaluation date:"):
        assert label in text, label
    assert errormap_path(TRAIN_INPUT).stat().st_size > 0 and tsne_path(TRAIN_INPUT).stat().st_size > 0

    best = result["best_unet"]
    for run in (run_name(p) for p in grid()):
        for patient in config.PATIENT_IDS["val"]:
            assert prediction_path(TRAIN_INPUT, run, "val", patient).is_file()
    pred = nib.load(prediction_path(TRAIN_INPUT, best, "test", config.PATIENT_IDS["test"][0]))
    assert pred.shape == SHAPE and np.allclose(pred.affine, np.diag([0.5, 0.5, 0.7, 1.0]))
    prob = pred.get_fdata()
    assert prob[:, :, 0].max() == 0 and 0 <= prob.min() and prob.max() <= 1  # slice 0 has no brain
    with open(patient_csv_path(TRAIN_INPUT, best, "test")) as f:
        rows = list(csv.DictReader(f))
    assert [r["patient"] for r in rows] == config.PATIENT_IDS["test"]
    assert int(rows[0]["n_truth"]) == 3 * 90 * 3

    # an existing result file is not replaced without --overwrite
    with pytest.raises(SystemExit):
        run_eval(missing_weights=missing)
    assert "exists already; pass --overwrite" in capsys.readouterr().err


def test_tsne_groups_real_evaluated_and_other_kind(workspace):
    groups = tsne_groups(synthetic_path(TRIAL, EPOCH, THRESH), np.zeros((30, 96, 96), np.float32))
    real = "real (train; internal, do not share)"
    assert list(groups) == [real, f"private (valid eps 5.2) {TRAIN_INPUT} (evaluated)",
                            f"non-private (eps inf) DP_NP_{EPOCH}_{THRESH}"]
    assert all(len(images) == config.N_TSNE_IMAGES for images in groups.values())
    assert groups[real].min() == 0 and groups[real].max() == 255  # min-max scaled per patch


def test_unets_trained_on_stripped_patches_refuse_raw_volumes(workspace, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(config, "SKULL_STRIP", False)
    with pytest.raises(SystemExit):
        run_eval(missing_weights=tmp_path / "none.pth")
    err = capsys.readouterr().err
    assert "model.pt (its training patches) was made from skull-stripped" in err and "SKULL_STRIP is False" in err
    assert not result_paths(TRAIN_INPUT)[0].exists() and not (workspace[1] / "predictions").exists()
    with pytest.raises(PipelineError, match="made from skull-stripped"):  # called alone, too
        evaluate_model_on_split(unet_dir(TRAIN_INPUT) / run_name(grid()[0]), "val", "cpu")


def test_unets_of_a_regenerated_set_are_refused(workspace, tmp_path, capsys):
    rng = np.random.default_rng(9)
    write_synthetic(TRIAL, 5.2, rng)  # generate_samples.py --overwrite under the same name: other pairs
    with pytest.raises(SystemExit):
        run_eval(missing_weights=tmp_path / "none.pth")
    err = capsys.readouterr().err
    assert "was trained on other contents" in err and "--overwrite" in err
    assert str(synthetic_path(TRIAL, EPOCH, THRESH)) in err and "model.pt" in err
    assert not result_paths(TRAIN_INPUT)[0].exists()


def test_eval_real_reuses_predictions_and_reports_undefined_bahd(workspace, tmp_path):
    write_unets("real")
    (unet_dir("real") / run_name(grid()[0]) / "model.pt").unlink()
    with pytest.raises(PipelineError, match=r"1 of the 2 U-Nets .* train them with `python run_unet.py --real`"):
        evaluate_training_input(eval_unet.parse_args(["--real"]))
    write_unets("real")
    missing = tmp_path / "none.pth"
    run_eval(trial=None, missing_weights=missing)
    txt, js = result_paths("real")
    result = json.loads(js.read_text())
    assert result["epsilon"] == "real data"
    assert result["fid"] == result["ssim_generated"] == "not applicable (real training data)"
    assert 0 <= result["ssim_real"] <= 1
    assert not tsne_path("real").exists()

    # a cached prediction is reused: an empty one gives DSC 0 and an undefined bAHD, reported as such
    pred_file = prediction_path("real", result["best_unet"], "test", config.PATIENT_IDS["test"][0])
    pred = nib.load(pred_file)
    prob = pred.get_fdata()
    val_file = prediction_path("real", result["best_unet"], "val", config.PATIENT_IDS["val"][0])
    val_written = val_file.stat().st_mtime_ns
    txt.unlink()
    js.unlink()
    save_probability_map(pred_file, np.zeros(SHAPE, np.float32), pred.affine)
    run_eval(trial=None, missing_weights=missing)
    result = json.loads(js.read_text())
    assert val_file.stat().st_mtime_ns == val_written
    assert result["test_dsc"]["mean"] == 0
    assert result["test_bahd"]["mean"] is None and result["test_bahd_undefined"]["count"] == 1
    assert "test bAHD mm mean (SD), patients with a defined bAHD: undefined" in txt.read_text()

    # --overwrite predicts again
    run_eval("--overwrite", trial=None, missing_weights=missing)
    np.testing.assert_allclose(nib.load(pred_file).get_fdata(), prob, atol=1e-6)
    assert val_file.stat().st_mtime_ns > val_written


def test_missing_test_patches_are_extracted(workspace):
    patches_path("test").unlink()
    path = ensure_test_patches()
    patches = np.load(path)
    assert len(patches["img"]) == config.PATCHES_PER_PATIENT * len(config.PATIENT_IDS["test"])
    assert set(patches.files) >= {"img", "label", "patient", "centre"}


# ---- collapsed U-Nets ----
def write_val_predictions(unet_name, prob):
    """Cached val probability maps of a U-Net trained on the real patches (reused by eval_unet.py)."""
    for patient in config.PATIENT_IDS["val"]:
        save_probability_map(prediction_path("real", unet_name, "val", patient), prob, np.diag([0.5, 0.5, 0.7, 1.0]))


def test_a_collapsed_unet_is_reported_and_never_selected(workspace, tmp_path):
    write_unets("real")
    first, second = (run_name(params) for params in grid())
    empty = np.zeros(SHAPE, np.float32)
    false_positive = empty.copy()
    false_positive[15:20, 30:34, 2] = 1.0  # 20 voxels of brain without vessel: DSC 0 as for the empty map, but
    assert 20 >= config.COLLAPSE_FRACTION * 3 * 90 * 3  # enough of them (the label has 3 x 90 x 3) not to collapse
    write_val_predictions(first, empty)
    write_val_predictions(second, false_positive)
    run_eval(trial=None, missing_weights=tmp_path / "none.pth")
    txt, js = result_paths("real")
    result = json.loads(js.read_text())
    val_dsc = result["val_dsc_all_unets"]
    assert val_dsc[first]["mean"] == val_dsc[second]["mean"] == 0  # a tie the grid order would give to `first`
    assert result["collapsed_unets"] == [first] and result["best_unet"] == second and "warning" not in result
    assert f"; never selected): {first}\n" in txt.read_text()

    # every U-Net collapsed: the result file says so first
    txt.unlink()
    js.unlink()
    write_val_predictions(second, empty)
    run_eval(trial=None, missing_weights=tmp_path / "none.pth")
    result = json.loads(js.read_text())
    assert result["collapsed_unets"] == [first, second] and result["best_unet"] == first
    assert "WARNING: every U-Net of the grid collapsed (predict(s) (almost) no vessel on val" in txt.read_text()
