"""Whole-volume segmentation: tiling, prediction at the right voxels, scores and their summary over patients."""

import csv
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from tests.test_evaluation import write_patches, write_unets, write_volume
from utils.common import PipelineError, unet_dir
from utils.data import patient_ids
from utils.inference import (
    brain_box_tiles,
    evaluate_model_on_split,
    patient_csv_path,
    predict_volume,
    prediction_path,
    score,
    summarise,
)
from utils.unet import grid, run_name


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


# ---- a split, predicted once and then from the cache ----
def test_a_split_is_predicted_once_and_a_prediction_older_than_its_unet_is_refused(dirs):
    rng = np.random.default_rng(5)
    write_volume(dirs[0] / "val", "val_000", rng)
    write_patches("train", 30, rng)
    write_unets("real")
    run_dir = unet_dir("real") / run_name(grid()[0])
    rows = evaluate_model_on_split(run_dir, "val", "cpu")
    assert [row["patient"] for row in rows] == patient_ids("val") and rows[0]["n_truth"] == 3 * 90 * 3
    with open(patient_csv_path("real", run_dir.name, "val")) as f:
        assert [row["patient"] for row in csv.DictReader(f)] == patient_ids("val")
    cached = prediction_path("real", run_dir.name, "val", patient_ids("val")[0])
    assert evaluate_model_on_split(run_dir, "val", "cpu") == rows  # rescored from the cached map

    trained = (run_dir / "model.pt").stat().st_mtime
    os.utime(cached, (trained - 10, trained - 10))  # the U-Net was retrained after this prediction
    with pytest.raises(PipelineError, match=f"prediction {cached} is older than the U-Net .*--overwrite"):
        evaluate_model_on_split(run_dir, "val", "cpu")
    assert evaluate_model_on_split(run_dir, "val", "cpu", overwrite=True) == rows  # the same U-Net: the same map
    assert cached.stat().st_mtime > trained
