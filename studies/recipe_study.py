"""Recipe study of the demo's GANs on skull-stripped phantoms: which private recipe teaches a U-Net most
at a valid epsilon <= 8, against its non-private reference with the same start and updates.

Each row trains one GAN on the demo's training patches (run_gan.py with the row's flags, the noise multiplier from
the calculator for the row's target epsilon), draws its synthetic set (generate_samples.py), trains the demo's U-Net
on it (run_unet.py) without and/or with augmentation (--unet_aug) and selects and tests each on whole volumes
(eval_unet.py's selection), all in ROOT/<row>_seed<seed>/. It reads the demo's data, training and test patches and
public GAN (--demo_work: run `make demo` first), so every row shares them. What exists is reused. Each row writes
row.json there; `--table` gathers them into ROOT/recipe_study.csv and prints a Markdown table.

    DPGAN_PRESET=demo .venv/bin/python studies/recipe_study.py --rows p_nd5 p_b128     # one after another
    DPGAN_PRESET=demo .venv/bin/python studies/recipe_study.py --table
"""

import argparse
import csv
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DPGAN_PRESET", "demo")
os.environ.setdefault("DPGAN_DATA_DIR", str(ROOT / "demo_data"))
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import config  # noqa: E402
import generate_samples  # noqa: E402
import run_gan  # noqa: E402
import run_unet  # noqa: E402
from utils import privacy  # noqa: E402
from utils.common import gan_results_dir, patches_path, synthetic_name, synthetic_path  # noqa: E402
from utils.evaluation import select_and_test  # noqa: E402
from utils.gan_log import read_log  # noqa: E402
from utils.unet import run_unets  # noqa: E402

TARGET_EPSILON = 8.0
# name: (what changes, run_gan.py flags beyond --trial/--noisem/--epochs/--seed, epochs, private, public start)
RECIPES = {
    "real": ("U-Net on the real training patches (no GAN)", None, 0, False, False),
    "public": ("the public GAN alone: no training on the patients", None, config.EPOCHS, False, False),
    "np_b128": ("non-private reference: public start, n_D 1, batch 128, 2 epochs", ["--batch_size", "128"], 2, False,
                True),
    "np_b128_lr4": ("non-private reference at a quarter of the learning rate: public start, n_D 1, batch 128, 2 epochs",
                    ["--batch_size", "128", "--lrd", "5e-5", "--lrg", "5e-5"], 2, False, True),
    "np_b128_lr16": ("non-private reference at a sixteenth of the learning rate: public start, n_D 1, batch 128, "
                     "2 epochs", ["--batch_size", "128", "--lrd", "1.25e-5", "--lrg", "1.25e-5"], 2, False, True),
    "np_b128_lrd10": ("non-private reference with the critic at a tenth of the learning rate (2e-5; the generator's "
                      "stays 2e-4): public start, n_D 1, batch 128, 2 epochs",
                      ["--batch_size", "128", "--lrd", "2e-5"], 2, False, True),
    "np_b128_lrd4": ("non-private reference with the critic at a quarter of the learning rate (5e-5; the generator's "
                     "stays 2e-4): public start, n_D 1, batch 128, 2 epochs",
                     ["--batch_size", "128", "--lrd", "5e-5"], 2, False, True),
    "np_b128_lrd40": ("non-private reference with the critic at a fortieth of the learning rate (5e-6; the "
                      "generator's stays 2e-4): public start, n_D 1, batch 128, 2 epochs",
                      ["--batch_size", "128", "--lrd", "5e-6"], 2, False, True),
    "np_b128_lrd10_4ep": ("np_b128_lrd10 for 4 epochs (twice the private row's updates)",
                          ["--batch_size", "128", "--lrd", "2e-5"], 4, False, True),
    "p_b128_lrd10": ("p_b128 with the critic at a tenth of the learning rate (2e-5; the generator's stays 2e-4)",
                     ["--batch_size", "128", "--lrd", "2e-5"], 2, True, True),
    "np_b128_ema999": ("non-private reference with a slower generator EMA (0.999): public start, batch 128, 2 epochs",
                       ["--batch_size", "128", "--ema", "0.999"], 2, False, True),
    "p_b128_ema999": ("p_b128 with a slower generator EMA (0.999)", ["--batch_size", "128", "--ema", "0.999"], 2, True,
                      True),
    "p_b128_n0.1": ("the private step with a tenth of the noise (a large epsilon): n_D 1, batch 128, 2 epochs",
                    ["--batch_size", "128", "--noisem", "0.1"], 2, True, True),
    "np_ref_4ep": ("non-private reference: public start, n_D 1, batch 32, 4 epochs", [], 4, False, True),
    "p_nd1_4ep": ("n_D 1, batch 32, 4 epochs", [], 4, True, True),
    "np_ref": ("non-private reference: public start, n_D 1, batch 32, 2 epochs", [], 2, False, True),
    "p_nd1": ("the demo's private step: n_D 1, batch 32, 2 epochs", [], 2, True, True),
    "p_nd5": ("n_D 5, batch 32, 1 epoch", ["--n_discr", "5"], 1, True, True),
    "p_nd5_2ep": ("n_D 5, batch 32, 2 epochs", ["--n_discr", "5"], 2, True, True),
    "p_b128": ("n_D 1, batch 128, 2 epochs", ["--batch_size", "128"], 2, True, True),
    "p_b128_nd5": ("n_D 5, batch 128, 2 epochs", ["--batch_size", "128", "--n_discr", "5"], 2, True, True),
    "np_b128_nd5": ("non-private reference with 5 critic steps per generator step: public start, batch 128, 2 epochs",
                    ["--batch_size", "128", "--n_discr", "5"], 2, False, True),
    "np_b128_8ep": ("non-private reference: public start, n_D 1, batch 128, 8 epochs", ["--batch_size", "128"], 8,
                    False, True),
    "p_b128_nd20": ("n_D 20, batch 128, 1 epoch", ["--batch_size", "128", "--n_discr", "20"], 1, True, True),
    "p_b128_nd50": ("n_D 50, batch 128, 1 epoch", ["--batch_size", "128", "--n_discr", "50"], 1, True, True),
    "p_b128_adaptive": ("Bie et al.'s adaptive n_D (from 1, accuracy threshold 0.6, grace 200), batch 128, the "
                        "critic steps of 10 epochs at n_D 1", ["--batch_size", "128", "--adaptive_critic", "0.6",
                                                               "--adaptive_grace", "200", "--n_discr", "1"], 10, True,
                        True),
    "p_b128_5ep": ("n_D 1, batch 128, 5 epochs (the utility preset's private GAN)", ["--batch_size", "128"], 5, True,
                   True),
    "np_b128_5ep": ("non-private reference: public start, n_D 1, batch 128, 5 epochs (the utility preset's)",
                    ["--batch_size", "128"], 5, False, True),
    "p_b128_8ep": ("n_D 1, batch 128, 8 epochs", ["--batch_size", "128"], 8, True, True),
    "p_b512": ("n_D 1, batch 512, 8 epochs", ["--batch_size", "512"], 8, True, True),
    "p_noema": ("p_nd1 without generator EMA", ["--ema", "0"], 2, True, True),
    "p_cold": ("p_nd1 from random weights", [], 2, True, False),
    "p_b128_noema": ("p_b128 without generator EMA", ["--batch_size", "128", "--ema", "0"], 2, True, True),
    "p_b128_cold": ("p_b128 from random weights", ["--batch_size", "128"], 2, True, False),
}
COLUMNS = ("row", "seed", "thresh", "change", "noise", "epsilon_valid", "updates", "critic_steps", "gan_seconds",
           "noise_to_signal", "clipped_fraction", "vessel_fraction", "test_dsc_aug0", "test2_dsc_aug0",
           "test_dsc_aug1", "test2_dsc_aug1")


def recipe_flags(name, seed, public_start):
    """(run_gan.py flags, noise multiplier, epochs) of a row; the noise reaches TARGET_EPSILON (strict, RDP)."""
    _, flags, epochs, private, warm = RECIPES[name]
    p = run_gan.parse_args(["--trial", "x", *flags])
    noise = math.inf
    if private and "--noisem" in flags:  # the row names its own noise
        noise = p.noisem
    elif private:
        n_train = config.N_PATIENTS["train"] * config.PATCHES_PER_PATIENT
        noise = privacy.noise_for_target_epsilon(TARGET_EPSILON, epochs, p.batch_size, n_train, p.n_discr, "strict")
        noise = math.ceil(noise * 100) / 100
    flags = [*flags, "--noisem", str(noise), "--epochs", str(epochs), "--seed", str(seed)]
    if warm:
        flags += ["--init_from", str(public_start)]
    return flags, noise, epochs


def unet_scores(row, flags, train_input, augmentations, device):
    """Train and select the U-Net of each augmentation setting on one training input; its test scores into row."""
    for augmentation in augmentations:
        config.UNET_AUGMENTATION = (augmentation,)
        run_unets(run_unet.parse_args([*flags, "--device", str(device)]))
        selection = select_and_test(train_input, "run_unet.py", device)
        for split in ("test", "test2"):
            row[f"{split}_dsc_aug{int(augmentation)}"] = round(selection[split]["dsc_mean"], 3)
    return row


def study_row(name, seed, demo_work, augmentations, device):
    """Train, synthesise, train U-Nets and test one row (config.WORK_DIR already set); returns its dict."""
    for split in ("train", "test"):
        if not patches_path(split).is_file():
            patches_path(split).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(demo_work / "patches" / patches_path(split).name, patches_path(split))
    if name == "real":
        return unet_scores({"row": name, "seed": seed, "change": RECIPES[name][0]}, ["--real"], "real",
                           augmentations, device)
    public = f"WGAN_{config.PRESET}_public"
    public_start = demo_work / "public" / "models" / public / f"epoch_{config.EPOCHS - 1}.pth"
    trial = "gan"
    log_path = gan_results_dir(trial) / "log.csv"
    if name == "public":  # its run, copied: synthesis and U-Nets as for any other row
        for kind in ("models", "results"):
            if not (config.WORK_DIR / kind / f"WGAN_{trial}").is_dir():
                shutil.copytree(demo_work / "public" / kind / public, config.WORK_DIR / kind / f"WGAN_{trial}")
        flags, noise, epochs = [], math.inf, config.EPOCHS
    else:
        flags, noise, epochs = recipe_flags(name, seed, public_start)
    epoch = epochs - 1
    start = time.time()
    if len(read_log(log_path)) < epochs:
        run_gan.main(["--trial", trial, *flags, "--device", str(device)] + (["--resume"] if log_path.is_file() else []))
    gan_seconds = round(time.time() - start)
    set_path = synthetic_path(trial, epoch, config.THRESH)
    if not set_path.is_file():
        generate_samples.main(["--trial", trial, "--epoch", str(epoch), "--thresh", str(config.THRESH),
                               "--device", str(device)])
    log = read_log(log_path)
    gan_args = json.loads((gan_results_dir(trial) / "config.json").read_text())["args"]
    critic_steps = epochs * gan_args["n_discr"] * privacy.steps_per_epoch(
        config.N_PATIENTS["train"] * config.PATCHES_PER_PATIENT, gan_args["batch_size"])
    with np.load(set_path) as pairs:
        vessel_fraction = round(float(pairs["label"].mean()), 4)
    row = {"row": name, "seed": seed, "change": RECIPES[name][0], "noise": noise,
           "epsilon_valid": json.loads(set_path.with_suffix(".json").read_text())["epsilon_valid"],
           "updates": log[-1]["generator_updates"], "critic_steps": critic_steps, "gan_seconds": gan_seconds,
           "vessel_fraction": vessel_fraction}
    for key in ("noise_to_signal", "clipped_fraction"):  # DP diagnostics, averaged over the epochs (internal)
        values = [r[key] for r in log]
        row[key] = round(sum(values) / len(values), 3) if all(math.isfinite(v) for v in values) else None
    flags = ["--trial", trial, "--epoch", str(epoch), "--thresh", str(config.THRESH)]
    return unet_scores(row, flags, synthetic_name(trial, epoch, config.THRESH), augmentations, device)


def table(root):
    rows = [json.loads(p.read_text()) for p in sorted(root.glob("*/row*.json"))]
    with open(root / "recipe_study.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "")) for k in COLUMNS) + " |")
    print_seed_summary(rows)


def print_seed_summary(rows):
    """Mean, SD (n - 1) and worst seed of each row's test and test2 DSC over the GAN seeds it was run with: the
    figures by which a recipe is judged over seeds."""
    groups = {}
    for r in rows:
        groups.setdefault((r["row"], r.get("thresh")), []).append(r)
    print("\n| row | thresh | GAN seeds | " + " | ".join(f"{split} DSC mean (SD), worst (seed)"
                                                         for split in ("test", "test2")) + " |")
    print("|---|---|---|---|---|")
    for (name, thresh), group in groups.items():
        cells = []
        for split in ("test", "test2"):
            # the U-Net with augmentation where the row trained one (the demo's), else without
            scored = [(r[f"{split}_dsc_aug1"] if r.get(f"{split}_dsc_aug1") is not None else r[f"{split}_dsc_aug0"],
                       r["seed"]) for r in group]
            values = np.array([value for value, _ in scored])
            sd = f"{values.std(ddof=1):.3f}" if len(values) > 1 else "-"
            worst = min(scored)
            cells.append(f"{values.mean():.3f} ({sd}), {worst[0]:.3f} ({worst[1]})")
        print(f"| {name} | {thresh} | {', '.join(str(r['seed']) for r in group)} | " + " | ".join(cells) + " |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=ROOT / "recipe_study", help="folder of the rows' outputs")
    p.add_argument("--rows", nargs="*", default=[], choices=sorted(RECIPES), help="rows to run, in order")
    p.add_argument("--seed", type=int, default=config.GAN_SEED, help="GAN seed of the rows")
    p.add_argument("--thresh", type=float, default=config.THRESH, help="label threshold of the synthetic sets")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--demo_work", type=Path, default=ROOT / "demo_work", help="the demo's work folder")
    p.add_argument("--unet_aug", choices=("off", "on", "both"), default="both", help="U-Net augmentation")
    p.add_argument("--table", action="store_true", help="gather every row.json under --root into a table")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    augmentations = {"off": (False,), "on": (True,), "both": (False, True)}[args.unet_aug]
    default_thresh, config.THRESH = config.THRESH, args.thresh
    if args.rows and not (args.demo_work / "public").is_dir():
        raise SystemExit(f"the demo's public GAN is not in {args.demo_work}: run `make demo` first")
    for name in args.rows:
        config.WORK_DIR = args.root / f"{name}_seed{args.seed}"
        start = time.time()
        row = study_row(name, args.seed, args.demo_work, augmentations, torch.device("cpu"))
        row["seconds"], row["thresh"] = round(time.time() - start), args.thresh
        name = "row.json" if args.thresh == default_thresh else f"row_thresh{args.thresh:g}.json"
        (config.WORK_DIR / name).write_text(json.dumps(row, indent=2) + "\n")
        print(json.dumps(row), flush=True)
    if args.table:
        table(args.root)


if __name__ == "__main__":
    main()
