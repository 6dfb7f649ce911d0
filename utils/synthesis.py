"""Step 3: draw image-label pairs from a trained generator (docs/method.md, "Synthesis").

The label threshold compares the generator's RAW label output (tanh, in [-1, 1]) with `thresh`:
label = 1 where output > thresh, else 0. The critic only ever saw real label channels of 0 and 1 (they
are not rescaled to [-1, 1], see the contract's GAN input pair), so the generator learns to put background
near 0 and vessels near 1, and `thresh` lives on that 0/1 label scale, as in the authors' code
(`--thresh 0.8`: vessel where the output is above 0.8). It must therefore lie in [0, 1). A generator trained
with --label_scale pm1 saw real labels of -1 and 1; its raw output is compared with 2 thresh - 1, the same
point of that scale (label_threshold).

A checkpoint with an EMA of the generator's weights (run_gan.py --ema) is sampled with the EMA weights:
averaging is post-processing of the DP outputs and usually gives cleaner samples.

The image channel is min-max scaled per patch to [0, 255], the U-Net's input scale.

Selection is part of the mechanism (docs/privacy.md): --epoch 9999 chooses by looking at every logged epoch's generator
loss, which depends on every epoch's critic, so the set carries the epsilon of the last epoch the choice looked
at, not that of the chosen epoch. An explicitly named epoch carries its own. The same holds among runs: a set
picked among several runs on the same patients by looking at their results (--chosen_from) carries the epsilon
of all of them, composed (utils/release.py runs_privacy).
"""

import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import config
from model import PATCH
from utils import release
from utils.common import (
    PipelineError,
    check_writable,
    gan_model_dir,
    gan_results_dir,
    load_json,
    minmax_scale,
    refuse_existing,
    resolve_device,
    save_figure,
    save_json,
    save_npz,
    synthetic_name,
    synthetic_path,
)
from utils.data import stripped_of
from utils.gan_checkpoints import build_generator, checkpoint_epochs, checkpoint_path, load_checkpoint
from utils.gan_log import read_log as read_log_file
from utils.locks import owned

BEST_EPOCH = 9999  # --epoch 9999: the epoch of minimum generator loss after the skipped ones
SHAPE_FLAGS = ("ngf", "kg", "strg", "padg", "opg", "upsampling")  # generate_samples.py flags = model_args keys
GRID_PAIRS = 16  # image-label pairs shown in the PNG beside a synthetic set


def available_epochs(trial):
    """The epochs with a generator checkpoint, sorted; a trial that does not exist is a PipelineError."""
    folder = gan_model_dir(trial)
    if not folder.is_dir():
        raise PipelineError(f"GAN trial {trial!r} does not exist: no folder {folder} (train it with "
                            f"`python run_gan.py --trial {trial}`)")
    return checkpoint_epochs(trial)


def read_log(trial):
    """The trial's log.csv rows (utils.gan_log.read_log), which must exist and hold the columns the choice of an
    epoch and its epsilon need."""
    path = gan_results_dir(trial) / "log.csv"
    if not path.is_file():
        raise PipelineError(f"GAN trial {trial!r}: its log {path} does not exist")
    rows = read_log_file(path)
    if not rows:
        raise PipelineError(f"GAN log {path} has no epochs")
    missing = {"epoch", "loss_g", "epsilon", "epsilon_valid"} - rows[0].keys()
    if missing:
        raise PipelineError(f"GAN log {path} lacks the columns {sorted(missing)} (it has {sorted(rows[0])})")
    return rows


def read_trial_config(trial):
    return load_json(gan_results_dir(trial) / "config.json", f"GAN trial {trial!r}: its config")


def select_epoch(log, epoch, nr_e_skipped):
    """(epoch, selection): `epoch` itself, or for 9999 the (first) epoch of minimum loss_g among the epochs >=
    nr_e_skipped. selection records the rule, the epochs whose logged values the choice looked at and the epoch
    whose privacy the result carries (the last of those; the chosen epoch itself when none was looked at)."""
    if epoch != BEST_EPOCH:
        return epoch, {"rule": f"epoch {epoch}, named by the user", "epochs_seen": [], "privacy_of_epoch": epoch}
    candidates = [row for row in log if row["epoch"] >= nr_e_skipped]
    if not candidates:
        raise PipelineError(f"--epoch {BEST_EPOCH} --nr_e_skipped {nr_e_skipped}: the log has only the epochs "
                            f"{[row['epoch'] for row in log]}, none left after skipping")
    seen = [row["epoch"] for row in candidates]
    chosen = min(candidates, key=lambda row: row["loss_g"])["epoch"]
    return chosen, {"rule": f"minimum generator loss over the logged epochs from {nr_e_skipped} on",
                    "epochs_seen": seen, "privacy_of_epoch": max(seen)}


def load_generator(trial, epoch, flags):
    """Build the generator of a checkpoint; `flags` = {shape flag: value or None}. Returns (generator, model_args).

    A shape flag left at None takes the checkpoint's value; a flag that contradicts it is a PipelineError.
    """
    path = checkpoint_path(trial, epoch)
    if not path.is_file():
        epochs = available_epochs(trial)
        raise PipelineError(f"GAN trial {trial!r} has no checkpoint for epoch {epoch} ({path}); the epochs that "
                            f"exist are {', '.join(map(str, epochs)) if epochs else 'none'}")
    checkpoint = load_checkpoint(path)
    try:
        model_args = dict(checkpoint["model_args"])
        state = checkpoint.get("generator_ema") or checkpoint["generator"]
    except (KeyError, TypeError, AttributeError) as err:
        raise PipelineError(f"checkpoint {path} lacks {err} (expected keys 'generator' and 'model_args')") from None
    for name in SHAPE_FLAGS:
        given = flags.get(name)
        if given is not None and given != model_args.get(name):
            raise PipelineError(f"--{name} {given} contradicts the checkpoint {path}, which has {name}="
                                f"{model_args.get(name)}; leave --{name} out to use the checkpoint's value")
    generator = build_generator(model_args)
    try:
        generator.load_state_dict(state)
    except RuntimeError as err:
        raise PipelineError(f"checkpoint {path}: the generator does not match its model_args: {err}") from None
    return generator.eval(), model_args


def label_threshold(thresh, label_scale):
    """The threshold on the generator's raw label output for `thresh` on the 0/1 label scale."""
    return thresh if label_scale == "01" else 2 * thresh - 1


def to_pairs(output, thresh):
    """Generator output B x 2 x P x P (P: the patch size) -> img float32 B x P x P x 1 in [0, 255] (per patch
    min-max) and label uint8 B x P x P x 1 = (raw label output > thresh); see the module docstring."""
    output = output.detach().float().cpu().numpy()
    img = minmax_scale(output[:, 0], 0, 255)[..., None]
    label = (output[:, 1] > thresh).astype(np.uint8)[..., None]
    return img, label


def generate(generator, n_samples, thresh, seed, device, batch_size=None):
    """Draw n_samples pairs in batches (config.GENERATION_BATCH) with latent vectors from `seed`."""
    batch_size = batch_size or config.GENERATION_BATCH
    generator = generator.to(device)
    latent = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same z on every device
    img = label = None  # allocated at the first batch, in the generator's patch size
    with torch.no_grad(), tqdm(total=n_samples, desc="generating", unit="pair") as bar:
        for start in range(0, n_samples, batch_size):
            stop = min(start + batch_size, n_samples)
            z = torch.randn(stop - start, generator.latent_dim, 1, 1, generator=latent)
            pairs = to_pairs(generator(z.to(device)), thresh)
            if img is None:
                img = np.empty((n_samples, *pairs[0].shape[1:]), np.float32)
                label = np.empty((n_samples, *pairs[1].shape[1:]), np.uint8)
            img[start:stop], label[start:stop] = pairs
            bar.update(stop - start)
    return img, label


def default_n_samples(trial_config):
    """N of the trial's training set, as its config.json records it (not today's patches file, which may have been
    extracted again since)."""
    if trial_config.get("n_samples"):
        return int(trial_config["n_samples"])
    raise PipelineError("--n_samples not given, and the trial's config.json does not say how many training patches "
                        "it trained on; pass --n_samples")


def save_grid(path, img, label, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(GRID_PAIRS, len(img))
    cols = 8
    rows = max(1, math.ceil(2 * n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.5, rows * 1.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        axes.flat[2 * i].imshow(img[i, ..., 0], cmap="gray", vmin=0, vmax=255)
        axes.flat[2 * i + 1].imshow(label[i, ..., 0], cmap="gray", vmin=0, vmax=1)
    fig.suptitle(title)
    save_figure(path, fig)


def generate_samples(args):
    """generate_samples.py: write synthetic_path(trial, epoch, thresh), its .json and a .png grid."""
    if not 0 <= args.thresh < 1:
        raise PipelineError(f"--thresh {args.thresh}: the label threshold must lie in [0, 1) (the real labels "
                            f"are 0 and 1; see generate_samples.py --help)")
    if args.n_samples is not None and args.n_samples < 1:
        raise PipelineError(f"--n_samples {args.n_samples}: must be at least 1")
    out = synthetic_path(args.trial, args.epoch, args.thresh)
    set_name = synthetic_name(args.trial, args.epoch, args.thresh)
    if not args.overwrite:
        refuse_existing(out)
        refuse_existing(release.release_dir(set_name))
    with owned(out, f"synthetic set {set_name}"):  # one run at a time writes a set and its bundle
        return write_synthetic_set(args, out, set_name)


def write_synthetic_set(args, out, set_name):
    """The set `out` (+ .json, .png) and its release bundle, written together once every check has passed."""
    available_epochs(args.trial)  # a missing trial fails here, before anything else is read
    trial_config = read_trial_config(args.trial)
    log = read_log(args.trial)
    nr_e_skipped = config.NR_E_SKIPPED if args.nr_e_skipped is None else args.nr_e_skipped
    epoch, selection = select_epoch(log, args.epoch, nr_e_skipped)
    generator, model_args = load_generator(args.trial, epoch, {name: getattr(args, name) for name in SHAPE_FLAGS})
    if not any(r["epoch"] == epoch for r in log):
        raise PipelineError(f"GAN log {gan_results_dir(args.trial) / 'log.csv'} has no row for epoch {epoch}")
    trial_privacy = release.trial_privacy(args.trial, trial_config, selection["privacy_of_epoch"])
    # a pick among runs (--chosen_from) is a function of every run it was chosen from: their composed guarantee
    pick = release.chosen_from_privacy(trial_privacy, args.chosen_from) if args.chosen_from else None
    guarantee = pick or trial_privacy
    n_samples = args.n_samples or default_n_samples(trial_config)
    device = resolve_device(args.device)
    refusal = release.canary_refusal(args.trial, trial_config)
    set_bytes = n_samples * model_args.get("patch_size", PATCH) ** 2 * 5  # float32 image + uint8 label per pixel
    check_writable(out.parent, "synthetic set", need_bytes=set_bytes)
    if not refusal:
        check_writable(release.release_dir(set_name).parent, "release bundle", need_bytes=set_bytes)
    print(f"trial {args.trial}, epoch {epoch}" + (f" (min loss_g after skipping {nr_e_skipped})"
          if args.epoch == BEST_EPOCH else "") + f", {n_samples} pairs, thresh {args.thresh}, device {device}",
          flush=True)
    raw_threshold = label_threshold(args.thresh, model_args.get("label_scale", "01"))
    img, label = generate(generator, n_samples, raw_threshold, args.seed, device)
    run_args = trial_config.get("args", {})
    number = release.json_number
    info = {"trial": args.trial, "epoch_requested": args.epoch, "epoch": epoch, "thresh": args.thresh,
            "n_samples": n_samples, "epsilon": number(trial_privacy["epsilon"]),
            "epsilon_valid": number(guarantee["epsilon_valid"]),
            "epsilon_valid_prv": number(guarantee["epsilon_valid_prv"]), "selection": selection,
            "privacy_unit": trial_privacy["privacy_unit"], "delta": guarantee["delta"],
            "chosen_from": [r["trial"] for r in pick["runs"]] if pick else None,
            "epsilon_valid_single_run": number(trial_privacy["epsilon_valid"]),
            "accountant_history": trial_privacy["history"],  # the run's own, which a later pick composes
            "noisem": number(run_args.get("noisem")), "dp_mode": run_args.get("dp_mode"), "seed": args.seed,
            "model_args": model_args, "skull_stripped": stripped_of(trial_config),
            "started_from": run_args.get("init_from") if trial_config.get("init_sha256") else None,
            "label_rule": f"label = generator label output > {raw_threshold:g} (thresh {args.thresh} on the "
                          f"0/1 label scale)"}
    release.remove_staged_releases(set_name)  # what a stopped run left; this run owns the set
    for leftover in out.parent.glob(f".{out.name}.*"):
        if leftover.is_dir():
            shutil.rmtree(leftover)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    bundle = None
    try:  # everything is written before anything is replaced: a full disk leaves the old set and bundle as they were
        save_npz(staging / out.name, img=img, label=label)
        save_json(staging / out.with_suffix(".json").name, info)
        save_grid(staging / out.with_suffix(".png").name, img, label, f"{out.stem} ({epsilon_caption(info)})")
        if not refusal:
            statement = release.privacy_statement(trial_privacy, img, label, len(log), epoch, selection, pick)
            bundle = release.stage_release(set_name, img, label, generator, model_args, statement, args.trial)
        for suffix in (".json", ".png", ".npz"):  # the .npz, which marks a finished set, last
            os.replace(staging / out.with_suffix(suffix).name, out.with_suffix(suffix))
        bundle = bundle and release.commit_release(bundle, set_name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if bundle is not None and bundle.name.startswith("."):
            shutil.rmtree(bundle, ignore_errors=True)
    if refusal:
        print(f"wrote {out} (+ .json, .png; internal); vessel fraction {label.mean():.4f}\n{refusal}", flush=True)
        return Path(out)
    print(f"wrote {out} (+ .json, .png; internal) and the release bundle {bundle}; vessel fraction "
          f"{label.mean():.4f}", flush=True)
    return Path(out)


def epsilon_caption(info):
    """How a figure names a set's privacy: the valid epsilon; paper mode's count is marked as not valid."""
    valid = info["epsilon_valid"]
    if valid == "inf":
        return "non-private: epsilon inf"
    caption = f"valid epsilon {valid:.3g}"
    if info.get("dp_mode") == "paper":
        caption += f"; the paper's count {info['epsilon']:.3g} is not a valid bound"
    return caption
