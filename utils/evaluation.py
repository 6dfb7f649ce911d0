"""Step 5 (SPEC "Evaluation", paper section 3.4): whole-volume U-Net segmentation, model selection on `val`,
DSC and bAHD on `test` and `test2`, and the image quality of a synthetic training set (FID, SSIM, t-SNE).

Choices, where the SPEC leaves room:
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
- Image quality: real patches are min-max scaled per patch to [0, 255], the synthetic images' scale, before FID
  and SSIM. FID uses config.FID_N_IMAGES images per set (None: all), SSIM config.N_SSIM_IMAGES generated and
  as many real training images, t-SNE config.N_TSNE_IMAGES per group; every subset is a seeded random choice
  (config.EVAL_SEED). The t-SNE shows the real training patches, the evaluated synthetic set and, if present,
  one other synthetic set of each kind (non-private: epsilon inf; private: finite epsilon) that the evaluated
  set is not, the first by file name, like the paper's real / non-private / private figure.
- Cached predictions: a probability map that exists is reused (and rescored) unless --overwrite; one older
  than its U-Net's model.pt is an error (retrained U-Net: pass --overwrite). The per-patient CSVs are a pure
  function of the predictions and labels and are rewritten with them.
"""

import csv
import datetime
import gzip
import math
from collections import namedtuple
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

import config
from utils import metrics
from utils.common import (
    PipelineError,
    atomic_write,
    file_sha256,
    load_json,
    load_npz,
    minmax_scale,
    patches_path,
    refuse_existing,
    resolve_device,
    result_paths,
    run_unet_command,
    save_figure,
    save_json,
    training_input,
    unet_dir,
)
from utils.data import load_patient, patient_ids, preparation_name, validate_split
from utils.patches import ensure_patches, gather_patches
from utils.unet import (
    check_trained_on,
    check_unet_preparation,
    grid,
    is_collapsed,
    load_unet,
    predict_patches,
    run_name,
)

Tile = namedtuple("Tile", "x0 y0 own_x own_y")
Tile.__doc__ = """A 96 x 96 tile img[x0:x0+96, y0:y0+96, z] and the voxels it owns: img[own_x, own_y, z]."""

SCALE_CHUNK = 2048  # patches per chunk when min-max scaling real patches (bounds the temporary memory)
SELECTION_SPLIT = "val"
TEST_SPLITS = ("test", "test2")
# purposes of the seeded random subsets, so that each draw is independent of the others' sizes
FID_DRAW, SSIM_DRAW, TSNE_DRAW = 0, 1, 2


# ---- output paths of this step ----
def prediction_path(train_input, unet_name, split, patient):
    return config.WORK_DIR / "predictions" / train_input / unet_name / split / f"{patient}_prob.nii.gz"


def patient_csv_path(train_input, unet_name, split):
    return config.WORK_DIR / "results" / train_input / f"{unet_name}_{split}.csv"


def tsne_path(train_input):
    return config.WORK_DIR / "results" / f"{train_input}_tsne.png"


def errormap_path(train_input):
    return config.WORK_DIR / "results" / f"{train_input}_errormap.png"


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


# ---- model selection ----
def unet_runs(train_input, train_command):
    """The run folders of every U-Net of the grid; any missing one is a PipelineError naming them all."""
    folder = unet_dir(train_input)
    runs = [folder / run_name(params) for params in grid()]
    missing = [run.name for run in runs if not (run / "model.pt").is_file()]
    if missing:
        raise PipelineError(f"{len(missing)} of the {len(runs)} U-Nets of {train_input} are missing in {folder}: "
                            f"{', '.join(missing)}; train them with `{train_command}`")
    return runs


def select_and_test(train_input, train_command, device=None, overwrite=False):
    """Evaluate every U-Net on val, pick the best mean val DSC (first in grid order on ties) among those that did
    not collapse (predict (almost) no vessel on the val patients; all if every one did), evaluate it on test and
    test2. Returns dict val (run name -> summary), best (run dir), collapsed (run names), test and test2
    (summaries)."""
    runs = unet_runs(train_input, train_command)
    val = {}
    for run in tqdm(runs, desc=f"U-Nets on {SELECTION_SPLIT}", unit="U-Net"):
        val[run.name] = summarise(evaluate_model_on_split(run, SELECTION_SPLIT, device, overwrite,
                                                          train_input=train_input))
    collapsed = [run.name for run in runs if val[run.name]["collapsed"]]
    best = max([run for run in runs if run.name not in collapsed] or runs, key=lambda run: val[run.name]["dsc_mean"])
    out = {"val": val, "best": best, "collapsed": collapsed}
    for split in tqdm(TEST_SPLITS, desc=f"best U-Net {best.name}", unit="split"):
        out[split] = summarise(evaluate_model_on_split(best, split, device, overwrite, train_input=train_input))
    return out


# ---- image quality ----
def choose(n_total, n, draw):
    """Sorted indices of a seeded random subset of n (None or >= n_total: all) of n_total items."""
    if n is None or n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng([config.EVAL_SEED, draw]).choice(n_total, size=n, replace=False))


def real_images(split, n=None, draw=FID_DRAW):
    """Real patches of a split (a seeded subset of n, or all), min-max scaled per patch to [0, 255]."""
    raw = load_npz(patches_path(split), ("img",), f"{split} patches")["img"]
    index = choose(len(raw), n, draw)
    out = np.empty((len(index), *raw.shape[1:]), np.float32)
    for start in range(0, len(index), SCALE_CHUNK):
        out[start:start + SCALE_CHUNK] = minmax_scale(raw[index[start:start + SCALE_CHUNK]], 0, 255)
    return out


def ensure_test_patches():
    """The test patches FID compares with; extracted like `extract_patches.py --split test` if missing."""
    return ensure_patches("test")


def synthetic_images(path):
    """The image array (N x 96 x 96, [0, 255]) of a synthetic set."""
    img = load_npz(path, ("img",), "synthetic set")["img"]
    return img[..., 0] if img.ndim == 4 else img


def fid_scores(generated, device, weights_path):
    """FID of the generated images to the real train and test patches, or why it was not computed."""
    ok, reason = metrics.fid_status(weights_path)
    if not ok:  # the reason may already start with "FID: not computed: "; say it once
        return {"fid": f"not computed: {reason.removeprefix('FID: ').removeprefix('not computed: ')}"}
    model = metrics.inception_model(device, weights_path)

    def features(images):
        return metrics.inception_features(images, model, device, config.FID_BATCH)

    gen_features = features(generated[choose(len(generated), config.FID_N_IMAGES, FID_DRAW)])
    ensure_test_patches()
    fid_train = float(metrics.frechet_distance(gen_features, features(real_images("train", config.FID_N_IMAGES))))
    fid_test = float(metrics.frechet_distance(gen_features, features(real_images("test", config.FID_N_IMAGES))))
    return {"fid_train": fid_train, "fid_test": fid_test, "fid_difference": fid_train - fid_test}


def image_quality(generated, device, weights_path):
    """FID (train, test, train - test) and mean pairwise SSIM of generated and real training images.
    generated None (training on real data): the generated-image metrics are not applicable."""
    n_ssim = config.N_SSIM_IMAGES
    ssim_real = float(metrics.mean_pairwise_ssim(real_images("train", n_ssim, SSIM_DRAW)))
    if generated is None:
        na = "not applicable (real training data)"
        return {"fid": na, "ssim_generated": na, "ssim_real": ssim_real}
    ssim_gen = float(metrics.mean_pairwise_ssim(generated[choose(len(generated), n_ssim, SSIM_DRAW)]))
    return {**fid_scores(generated, device, weights_path), "ssim_generated": ssim_gen, "ssim_real": ssim_real}


def read_set_info(npz_path):
    """The JSON written beside a synthetic set (its epsilon etc.); a clear error if missing or unreadable."""
    return load_json(Path(npz_path).with_suffix(".json"), f"the information file of synthetic set {npz_path}",
                     " (written by generate_samples.py)")


def epsilon_of(info):
    """The valid epsilon of a synthetic set's info as a float (inf for a non-private GAN), None if it has none."""
    try:
        return float(info.get("epsilon_valid"))
    except (TypeError, ValueError):
        return None


def tsne_groups(evaluated_path, generated):
    """{group name: images}: real training patches, the evaluated set and one other set of each missing kind."""
    n = config.N_TSNE_IMAGES
    epsilon = epsilon_of(read_set_info(evaluated_path))
    kinds_shown = set() if epsilon is None else {math.isinf(epsilon)}
    groups = {"real (train; internal, do not share)": real_images("train", n, TSNE_DRAW),
              f"{_kind(epsilon)} {evaluated_path.stem.removeprefix('gen_patches_')} (evaluated)":
                  generated[choose(len(generated), n, TSNE_DRAW)]}
    for path in sorted((config.WORK_DIR / "synthetic").glob("gen_patches_*.npz")):
        if path == evaluated_path or not path.with_suffix(".json").is_file():
            continue
        other = epsilon_of(read_set_info(path))
        if other is None or math.isinf(other) in kinds_shown:
            continue
        kinds_shown.add(math.isinf(other))
        images = synthetic_images(path)
        groups[f"{_kind(other)} {path.stem.removeprefix('gen_patches_')}"] = images[choose(len(images), n, TSNE_DRAW)]
    return groups


def _kind(epsilon):
    if epsilon is None:
        return "synthetic"
    return "non-private (eps inf)" if math.isinf(epsilon) else f"private (valid eps {epsilon:.3g})"


# ---- error map ----
def errormap_figure(img, label, prob, title):
    """TP (green), FP (red) and FN (blue) of one axial slice over its grey image."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    pred = prob > config.PREDICTION_THRESHOLD
    truth = label.astype(bool)
    colours = {"true positive": (0.1, 0.8, 0.1), "false positive": (0.9, 0.1, 0.1), "false negative": (0.1, 0.4, 1)}
    overlay = np.zeros((*img.shape, 4), np.float32)
    for colour, where in zip(colours.values(), (pred & truth, pred & ~truth, ~pred & truth)):
        overlay[where] = (*colour, 1.0)
    fig, ax = plt.subplots(figsize=(7, 7 * img.shape[1] / img.shape[0]))
    ax.imshow(img.T, cmap="gray", origin="lower")
    ax.imshow(overlay.transpose(1, 0, 2), origin="lower", interpolation="nearest")
    ax.legend(handles=[Patch(color=c, label=n) for n, c in colours.items()], loc="upper right", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    return fig


def save_errormap(train_input, best_run):
    """Error map of the first test patient's slice with the most vessel voxels (from the cached prediction)."""
    patient = patient_ids("test")[0]
    volume = load_patient("test", patient)
    prob = load_probability_map(prediction_path(train_input, best_run.name, "test", patient), volume.img.shape)
    z = int(np.argmax(volume.label.sum(axis=(0, 1))))
    title = f"{train_input}, U-Net {best_run.name}: test patient {patient}, slice z={z}"
    return save_figure(errormap_path(train_input),
                       errormap_figure(volume.img[:, :, z], volume.label[:, :, z], prob[:, :, z], title))


# ---- the result file ----
def training_input_info(args):
    """(train_input, training data path, synthetic set info or None, `run_unet.py` command) for the flags."""
    train_input, path = training_input(args)
    return train_input, path, None if args.real else read_set_info(path), run_unet_command(args)


def result_fields(train_input, data_path, set_info, selection, quality, files):
    """The result as (text label, JSON key, value) triples, in the order of the text file."""
    best = selection["best"]
    meta = load_json(best / "meta.json", "U-Net meta") if (best / "meta.json").is_file() else {}
    hyper = {k: meta.get(k) for k in ("lr", "dropout", "augmentation", "epochs", "batch_size", "kernels", "n_train")}
    if set_info is None:
        privacy = [("epsilon", "epsilon", "real data"), ("epsilon (valid bound)", "epsilon_valid", "real data"),
                   ("epsilon (valid bound, PRV accountant)", "epsilon_valid_prv", "real data"),
                   ("privacy unit (what epsilon protects)", "privacy_unit", "none (real data)"),
                   ("GAN started from", "started_from", "no GAN (real data)")]
    else:
        paper = set_info.get("dp_mode") == "paper"
        privacy = [("epsilon as the run counted it" + (" (the paper's count: NOT a valid bound)" if paper else ""),
                    "epsilon", set_info.get("epsilon")),
                   ("epsilon (valid bound, RDP accountant)", "epsilon_valid", set_info.get("epsilon_valid")),
                   ("epsilon (valid bound, PRV accountant)", "epsilon_valid_prv", set_info.get("epsilon_valid_prv")),
                   ("epsilon is that of GAN epoch (the last one the choice of epoch looked at)", "privacy_of_epoch",
                    set_info.get("selection", {}).get("privacy_of_epoch", set_info.get("epoch"))),
                   ("DP mode", "dp_mode", set_info.get("dp_mode")),
                   ("privacy unit (what epsilon protects)", "privacy_unit", set_info.get("privacy_unit", "patch")),
                   ("noise multiplier", "noise_multiplier", set_info.get("noisem")),
                   ("GAN started from", "started_from", "public GAN" if set_info.get("started_from") else
                    "random weights"),
                   ("GAN's public start (run_gan.py --init_from)", "started_from_checkpoint",
                    set_info.get("started_from")),
                   ("GAN epoch", "gan_epoch", set_info.get("epoch"))]
    privacy += audit_fields(train_input, set_info)
    val_best = selection["val"][best.name]
    fields = [("training input", "training_input", train_input), ("training data", "training_data", str(data_path)),
              ("volumes and patches", "skull_stripped", preparation_name(config.SKULL_STRIP)), *privacy]
    collapsed = f"predict(s) (almost) no vessel on val: fewer voxels than {config.COLLAPSE_FRACTION:g} of the true"
    if len(selection["collapsed"]) == len(selection["val"]):
        fields.append(("WARNING", "warning", f"every U-Net of the grid collapsed ({collapsed}): the scores below "
                                             f"are those of {best.name}, which segments (almost) nothing"))
    fields += [("best U-Net (highest mean val DSC of those not collapsed)", "best_unet", best.name),
               (f"collapsed U-Nets ({collapsed}; never selected)", "collapsed_unets", selection["collapsed"]),
               ("best U-Net hyper-parameters", "best_unet_hyperparameters", hyper),
               ("val DSC mean (SD)", "val_dsc", _mean_sd(val_best["dsc_mean"], val_best["dsc_sd"]))]
    for split in TEST_SPLITS:
        s = selection[split]
        fields += [(f"{split} DSC mean (SD)", f"{split}_dsc", _mean_sd(s["dsc_mean"], s["dsc_sd"])),
                   (f"{split} DSC inside the brain mask mean (SD) [diagnostic, not the paper's metric: predictions "
                    f"outside the brain (skull, scalp) dropped]", f"{split}_dsc_brain",
                    _mean_sd(s["dsc_brain_mean"], s["dsc_brain_sd"])),
                   (f"{split} bAHD mm mean (SD), patients with a defined bAHD", f"{split}_bahd",
                    _mean_sd(s["bahd_mean"], s["bahd_sd"])),
                   (f"{split} bAHD undefined (empty prediction or truth), patients", f"{split}_bahd_undefined",
                    {"count": s["bahd_undefined"], "of": s["n_patients"], "patients": s["bahd_undefined_patients"]})]
    fields.append(("val DSC mean (SD) of every U-Net", "val_dsc_all_unets",
                   {name: _mean_sd(v["dsc_mean"], v["dsc_sd"]) for name, v in selection["val"].items()}))
    internal = " [internal: computed on training patches without noise, do not share]"
    labels = {"fid": "FID", "fid_train": "FID generated vs train" + internal, "fid_test": "FID generated vs test",
              "fid_difference": "FID difference (train - test)" + internal,
              "ssim_generated": f"SSIM generated (mean over pairs of {config.N_SSIM_IMAGES} images)",
              "ssim_real": f"SSIM real train (mean over pairs of {config.N_SSIM_IMAGES} images)" + internal}
    fields += [(labels[key], key, value) for key, value in quality.items()]
    fields += [("prediction threshold", "prediction_threshold", config.PREDICTION_THRESHOLD),
               ("evaluation date", "evaluation_date", datetime.datetime.now().isoformat(timespec="seconds")),
               ("config preset", "config_preset", config.PRESET), ("files", "files", files)]
    return fields


def audit_fields(train_input, set_info):
    """The membership-inference figures of audit_privacy.py for a synthetic set (read from its audit JSON)."""
    from utils.audit import AUDIT_FIGURES, audit_paths

    if set_info is None:
        return [("membership inference AUC", "mia_auc", "not applicable (real data)")]
    path = audit_paths(train_input)[0]
    if not path.is_file():
        return [("membership inference AUC", "mia_auc",
                 f"not computed: no {path.name} (run audit_privacy.py on this set before eval_unet.py)")]
    audit = load_json(path, "privacy audit")
    return [(label, key, audit.get(key)) for key, label in AUDIT_FIGURES.items()]


def _mean_sd(mean, sd):
    return {"mean": mean, "sd": sd}


def _text(value):
    if isinstance(value, dict) and set(value) == {"mean", "sd"}:
        return "undefined" if value["mean"] is None else f"{value['mean']:.4f} ({value['sd']:.4f})"
    if isinstance(value, dict) and set(value) == {"count", "of", "patients"}:
        named = f" ({', '.join(value['patients'])})" if value["patients"] else ""
        return f"{value['count']} of {value['of']}{named}"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_text(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_text(v) for v in value) if value else "none"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_results(fields, txt_path, json_path):
    text = "".join(f"{label}: {_text(value)}\n" for label, _, value in fields)
    atomic_write(txt_path, lambda tmp: Path(tmp).write_text(text))
    save_json(json_path, {key: value for _, key, value in fields})
    return text


def evaluate_training_input(args):
    """eval_unet.py: every check first, then selection on val, test and test2, image quality, figures, results."""
    train_input, data_path, set_info, train_command = training_input_info(args)
    txt_path, json_path = result_paths(train_input)
    if not args.overwrite:
        refuse_existing(txt_path)
        refuse_existing(json_path)
    if not patches_path("train").is_file():
        raise PipelineError(f"real training patches {patches_path('train')} do not exist; make them with "
                            f"`python extract_patches.py --split train`")
    digest = file_sha256(data_path)
    for run in unet_runs(train_input, train_command):
        check_trained_on(run, data_path, digest, f"{train_command} --overwrite")
        check_unet_preparation(run, f"{train_command} --overwrite")
    for split in (SELECTION_SPLIT, *TEST_SPLITS):
        for header in validate_split(split):
            check_in_plane(header.shape, f"{split} patient {header.patient}'s volume")
    device = resolve_device(args.device)
    weights = args.fid_weights or config.FID_WEIGHTS

    selection = select_and_test(train_input, train_command, device, args.overwrite)
    generated = None if set_info is None else synthetic_images(data_path)
    quality = image_quality(generated, device, weights)
    files = {"per-patient CSVs (<U-Net>_<split>.csv)": str(patient_csv_path(train_input, "x", "y").parent),
             "error map": str(save_errormap(train_input, selection["best"]))}
    if generated is not None:
        metrics.tsne_plot(tsne_groups(data_path, generated), tsne_path(train_input), config.TSNE_PERPLEXITY,
                          config.EVAL_SEED)
        files["t-SNE"] = str(tsne_path(train_input))
    fields = result_fields(train_input, data_path, set_info, selection, quality, files)
    # what compare_results.py checks the training file against: a set regenerated since makes these results stale
    fields.insert(2, ("training data sha256", "training_sha256", digest))
    return write_results(fields, txt_path, json_path), txt_path
