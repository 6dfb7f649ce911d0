"""Step 5 (docs/method.md, "Evaluation"; paper section 3.4): choice of the U-Net on `val`, its DSC and bAHD on
`test` and `test2`, the error map and the result files of eval_unet.py.

The volumes are segmented and scored by utils/inference.py; the image quality of a synthetic training set (FID,
SSIM, t-SNE) is utils/image_quality.py's. The size of the patches the U-Nets were trained on is read from their
training file (whose SHA-256 their meta.json holds), not from config.py, which may have changed since.
"""

import datetime
import zipfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

import config
from utils import metrics
from utils.common import (
    PipelineError,
    atomic_write,
    file_sha256,
    load_json,
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
from utils.image_quality import image_quality, read_set_info, synthetic_images, tsne_groups, tsne_path
from utils.inference import (
    check_in_plane,
    evaluate_model_on_split,
    load_probability_map,
    patient_csv_path,
    prediction_path,
    summarise,
)
from utils.unet import check_trained_on, check_unet_preparation, grid, run_name

SELECTION_SPLIT = "val"
TEST_SPLITS = ("test", "test2")


def errormap_path(train_input):
    return config.WORK_DIR / "results" / f"{train_input}_errormap.png"


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


def training_patch_size(data_path):
    """The side P of a training file's patches (images N x P x P, or N x P x P x 1 in a synthetic set), read from
    the npy header of its `img` without loading the array."""
    try:
        with zipfile.ZipFile(data_path) as archive, archive.open("img.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, _ = read_header(f)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise PipelineError(f"training file {data_path} cannot be read (for the size of its patches): {err}") from None
    return int(shape[1])


def check_patch_size(train_input, data_path):
    """The volumes are tiled in config.PATCH_SIZE tiles: that must be the size the U-Nets were trained on, which
    their training file records (config.py may have changed since)."""
    size = training_patch_size(data_path)
    if size != config.PATCH_SIZE:
        raise PipelineError(f"the U-Nets of {train_input} were trained on {size} x {size} patches ({data_path}), "
                            f"but config.PATCH_SIZE is {config.PATCH_SIZE}: they would segment the volumes in tiles "
                            f"of another size; evaluate them with config.PATCH_SIZE = {size}, the size they were "
                            f"trained with (nothing was written)")


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
    check_patch_size(train_input, data_path)
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
