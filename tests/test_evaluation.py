"""Evaluation: model selection, the checks before it and the result files of eval_unet.py, end to end on tiny
volumes."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch

import config
import eval_unet
from model import UNet
from utils.common import (
    PipelineError,
    file_sha256,
    patches_path,
    result_paths,
    save_json,
    save_npz,
    save_torch,
    synthetic_path,
    unet_dir,
)
from utils.data import patient_ids
from utils.evaluation import errormap_path, evaluate_training_input, training_patch_size
from utils.image_quality import tsne_path
from utils.inference import evaluate_model_on_split, patient_csv_path, prediction_path, save_probability_map
from utils.unet import grid, run_name

SHAPE = (128, 128, 4)
TRIAL, EPOCH, THRESH = "T1", 3, 0.8
TRAIN_INPUT = f"DP_{TRIAL}_{EPOCH}_{THRESH}"


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
        write_volume(data / split, f"{split}_000", rng)  # one patient, found from its files
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
        for patient in patient_ids("val"):
            assert prediction_path(TRAIN_INPUT, run, "val", patient).is_file()
    pred = nib.load(prediction_path(TRAIN_INPUT, best, "test", patient_ids("test")[0]))
    assert pred.shape == SHAPE and np.allclose(pred.affine, np.diag([0.5, 0.5, 0.7, 1.0]))
    prob = pred.get_fdata()
    assert prob[:, :, 0].max() == 0 and 0 <= prob.min() and prob.max() <= 1  # slice 0 has no brain
    with open(patient_csv_path(TRAIN_INPUT, best, "test")) as f:
        rows = list(csv.DictReader(f))
    assert [r["patient"] for r in rows] == patient_ids("test")
    assert int(rows[0]["n_truth"]) == 3 * 90 * 3

    # an existing result file is not replaced without --overwrite
    with pytest.raises(SystemExit):
        run_eval(missing_weights=missing)
    assert "exists already; pass --overwrite" in capsys.readouterr().err


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


def test_unets_are_tiled_at_the_patch_size_of_their_training_file_not_at_todays_config(workspace, tmp_path, capsys,
                                                                                       monkeypatch):
    data_path = synthetic_path(TRIAL, EPOCH, THRESH)
    assert training_patch_size(data_path) == training_patch_size(patches_path("train")) == 96  # N x P x P (x 1)
    monkeypatch.setattr(config, "PATCH_SIZE", 64)  # config.py changed since the U-Nets were trained
    with pytest.raises(SystemExit):
        run_eval(missing_weights=tmp_path / "none.pth")
    err = capsys.readouterr().err
    assert f"were trained on 96 x 96 patches ({data_path}), but config.PATCH_SIZE is 64" in err
    assert not result_paths(TRAIN_INPUT)[0].exists() and not (workspace[1] / "predictions").exists()
    data_path.write_bytes(b"not an npz")
    with pytest.raises(PipelineError, match=f"training file {data_path} cannot be read"):
        training_patch_size(data_path)


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
    pred_file = prediction_path("real", result["best_unet"], "test", patient_ids("test")[0])
    pred = nib.load(pred_file)
    prob = pred.get_fdata()
    val_file = prediction_path("real", result["best_unet"], "val", patient_ids("val")[0])
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


# ---- collapsed U-Nets ----
def write_val_predictions(unet_name, prob):
    """Cached val probability maps of a U-Net trained on the real patches (reused by eval_unet.py)."""
    for patient in patient_ids("val"):
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
