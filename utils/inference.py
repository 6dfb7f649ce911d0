"""Whole-volume U-Net segmentation and its scores (docs/method.md, "Evaluation"; paper section 3.4): the tiles of
a volume, its vessel probability map, the cached maps, and the DSC and bAHD of every patient of a split.

Choices, where the method leaves room:
- Tiling: in every axial slice with brain, tiles of 96 x 96 step by 96 from the brain's bounding box's first
  voxel; a tile that would cross the volume's edge is shifted back to end there (so only such a last tile
  overlaps its neighbour). A box narrower than 96 gets one tile starting at the box, clamped to the volume.
  Overlaps: every voxel takes its probability from the FIRST tile (in x, then y) that covers it, so each voxel
  of a tiled slice is written exactly once (no averaging: the authors' stitching gave each voxel one tile's
  output too). Tiles are predicted whole, so voxels of a tile outside the brain box get probabilities as well;
  voxels outside every tile (and slices without brain) are 0.
- Binarisation: probability > config.PREDICTION_THRESHOLD.
- Mean (SD) over patients: population SD (ddof 0). bAHD is undefined (inf) for a patient whose prediction or
  ground truth is empty; such patients are left out of the bAHD mean and SD and counted and named as
  "undefined" next to it, never averaged silently. DSC is averaged over every patient.
- Cached predictions: a probability map that exists is reused (and rescored) unless --overwrite; one older
  than its U-Net's model.pt is an error (retrained U-Net: pass --overwrite). The per-patient CSVs are a pure
  function of the predictions and labels and are rewritten with them.
"""

import csv
import gzip
import math
from collections import namedtuple
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

import config
from utils import metrics
from utils.common import PipelineError, atomic_write
from utils.data import load_patient, patient_ids
from utils.patches import gather_patches
from utils.unet import check_unet_preparation, is_collapsed, load_unet, predict_patches

Tile = namedtuple("Tile", "x0 y0 own_x own_y")
Tile.__doc__ = """A 96 x 96 tile img[x0:x0+96, y0:y0+96, z] and the voxels it owns: img[own_x, own_y, z]."""


# ---- output paths ----
def prediction_path(train_input, unet_name, split, patient):
    return config.WORK_DIR / "predictions" / train_input / unet_name / split / f"{patient}_prob.nii.gz"


def patient_csv_path(train_input, unet_name, split):
    return config.WORK_DIR / "results" / train_input / f"{unet_name}_{split}.csv"


# ---- whole-volume prediction ----
def axis_tiles(lo, hi, size, patch):
    """Tiles along one axis of length `size` covering the box [lo, hi): [(start, own_start, own_stop)].

    Starts step by `patch` from lo; one that would cross the axis' end is shifted back to end there. A position
    is owned by the first tile covering it: the owned ranges are disjoint, and their union (that of the
    tiles) contains [lo, hi)."""
    tiles = []
    for start in range(lo, hi, patch):
        start = min(start, size - patch)
        own_start = tiles[-1][0] + patch if tiles else start
        tiles.append((start, own_start, start + patch))
    return tiles


def check_in_plane(shape, what, patch=None):
    patch = config.PATCH_SIZE if patch is None else patch
    if shape[0] < patch or shape[1] < patch:
        raise PipelineError(f"{what} has shape {tuple(shape)}: smaller than a {patch} x {patch} tile in x or y, "
                            f"so it cannot be segmented tile by tile")


def brain_box_tiles(mask_slice, patch=None):
    """The tiles (list of Tile) of one axial slice: its brain's bounding box tiled as the module docstring says.

    An empty slice has none. A slice smaller than patch x patch is a PipelineError."""
    patch = config.PATCH_SIZE if patch is None else patch
    check_in_plane(mask_slice.shape, "an axial slice", patch)
    xs = np.flatnonzero(np.any(mask_slice, axis=1))
    ys = np.flatnonzero(np.any(mask_slice, axis=0))
    if xs.size == 0:
        return []
    x_tiles = axis_tiles(int(xs[0]), int(xs[-1]) + 1, mask_slice.shape[0], patch)
    y_tiles = axis_tiles(int(ys[0]), int(ys[-1]) + 1, mask_slice.shape[1], patch)
    return [Tile(x0, y0, slice(ox0, ox1), slice(oy0, oy1)) for x0, ox0, ox1 in x_tiles for y0, oy0, oy1 in y_tiles]


def predict_volume(model, meta, img, mask, device=None, batch_size=None):
    """Vessel probability map (float32, img's shape) of one volume.

    The tiles of every slice with brain are gathered and predicted together, batch_size
    tiles per forward pass (default: see utils.unet.predict_patches), each prepared by prepare_input."""
    if img.shape != mask.shape:
        raise PipelineError(f"image of shape {img.shape} and brain mask of shape {mask.shape} differ")
    check_in_plane(img.shape, "the volume")
    half = config.PATCH_SIZE // 2
    plan = [(z, tile) for z in np.flatnonzero(np.any(mask, axis=(0, 1)))
            for tile in brain_box_tiles(mask[:, :, z])]
    prob = np.zeros(img.shape, np.float32)
    if not plan:
        return prob
    centres = np.array([(tile.x0 + half, tile.y0 + half, z) for z, tile in plan])
    tiles_prob = predict_patches(model, gather_patches(img, centres), meta, device, batch_size)
    for (z, tile), tile_prob in zip(plan, tiles_prob):
        own = (slice(tile.own_x.start - tile.x0, tile.own_x.stop - tile.x0),
               slice(tile.own_y.start - tile.y0, tile.own_y.stop - tile.y0))
        prob[tile.own_x, tile.own_y, z] = tile_prob[own]
    return prob


def save_probability_map(path, prob, affine):
    image = nib.Nifti1Image(prob.astype(np.float32, copy=False), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    # compressed in memory (nibabel's own level 1), then written atomically under the final name
    data = gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def load_probability_map(path, shape):
    try:
        prob = nib.load(path).get_fdata(dtype=np.float32)
    except Exception as err:  # nibabel raises many types for a damaged file
        raise PipelineError(f"prediction {path} cannot be read ({err}); pass --overwrite to predict again") from None
    if prob.shape != tuple(shape):
        raise PipelineError(f"prediction {path} has shape {prob.shape}, but the volume has {tuple(shape)}; pass "
                            f"--overwrite to predict again")
    return prob


# ---- scores ----
def score(prob, label, spacing, mask=None):
    """DSC and bAHD (mm) of the thresholded probability map against the label, and the voxel counts. With the
    brain mask also dsc_brain, the DSC of the prediction inside the mask (a diagnostic, not the paper's metric:
    it separates what a U-Net finds in the brain from false vessels on the skull and scalp)."""
    pred = prob > config.PREDICTION_THRESHOLD
    truth = label.astype(bool)
    brain = {} if mask is None else {"dsc_brain": float(metrics.dice(pred & mask.astype(bool), truth))}
    return {"dsc": float(metrics.dice(pred, truth)), **brain,
            "bahd": float(metrics.balanced_average_hausdorff(pred, truth, spacing)),
            "n_truth": int(truth.sum()), "n_pred": int(pred.sum())}


def summarise(rows):
    """Mean and SD over patients of DSC and (where defined) bAHD; undefined bAHDs counted and named; collapsed:
    (almost) no voxel predicted as vessel over all patients (utils.unet.is_collapsed)."""
    dsc = np.array([r["dsc"] for r in rows], np.float64)
    brain = np.array([r.get("dsc_brain", np.nan) for r in rows], np.float64)
    defined = [r["bahd"] for r in rows if math.isfinite(r["bahd"])]
    return {"n_patients": len(rows), "dsc_mean": float(dsc.mean()), "dsc_sd": float(dsc.std()),
            "dsc_brain_mean": float(brain.mean()), "dsc_brain_sd": float(brain.std()),
            "collapsed": is_collapsed(sum(r["n_pred"] for r in rows), sum(r["n_truth"] for r in rows)),
            "bahd_mean": float(np.mean(defined)) if defined else None,
            "bahd_sd": float(np.std(defined)) if defined else None,
            "bahd_undefined": len(rows) - len(defined),
            "bahd_undefined_patients": [r["patient"] for r in rows if not math.isfinite(r["bahd"])]}


def write_patient_csv(path, rows):
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["patient", "dsc", "dsc_brain", "bahd", "n_truth", "n_pred"],
                                    restval="")
            writer.writeheader()
            for row in rows:
                writer.writerow({**row, "bahd": row["bahd"] if math.isfinite(row["bahd"]) else "inf"})

    atomic_write(path, write)


def evaluate_model_on_split(run_dir, split, device=None, overwrite=False, batch_size=None, train_input=None):
    """Predict (or reuse the cached prediction of) every patient of `split` with the U-Net in run_dir, score it,
    write the per-patient CSV and return its rows (dicts patient, dsc, bahd, n_truth, n_pred).

    train_input defaults to run_dir's parent folder name (run_dir = unet_dir(train_input) / run name)."""
    run_dir = Path(run_dir)
    train_input = train_input or run_dir.parent.name
    check_unet_preparation(run_dir, "run_unet.py with --overwrite")
    model_file = run_dir / "model.pt"
    unet = None
    rows = []
    for patient in tqdm(patient_ids(split), desc=f"{run_dir.name} {split}", unit="patient", leave=False):
        volume = load_patient(split, patient)
        path = prediction_path(train_input, run_dir.name, split, patient)
        if path.exists() and not overwrite:
            if model_file.is_file() and path.stat().st_mtime < model_file.stat().st_mtime:
                raise PipelineError(f"prediction {path} is older than the U-Net {model_file} (retrained?); pass "
                                    f"--overwrite to predict again")
            prob = load_probability_map(path, volume.img.shape)
        else:
            if unet is None:
                unet = load_unet(run_dir, device)
            prob = predict_volume(*unet, volume.img, volume.mask, device, batch_size)
            save_probability_map(path, prob, volume.affine)
        rows.append({"patient": patient, **score(prob, volume.label, volume.spacing, volume.mask)})
    write_patient_csv(patient_csv_path(train_input, run_dir.name, split), rows)
    return rows
