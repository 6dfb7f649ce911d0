"""`make demo`: the whole experiment at a small scale on the CPU, one numbered step after another.

Runs the real scripts with the demo preset (DPGAN_PRESET=demo) in demo_data/ and demo_work/:
phantoms -> patches -> a non-private and a private DP-WGAN -> synthetic sets (and their release bundles) ->
membership-inference audit of each set -> U-Nets on real and on each synthetic set -> evaluation -> one
side-by-side table. A step whose output exists is skipped, so
running it again reuses what is there (delete demo_work/ to start over).
"""

import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("DPGAN_PRESET", "demo")
os.environ.setdefault("DPGAN_DATA_DIR", str(ROOT / "demo_data"))
os.environ.setdefault("DPGAN_WORK_DIR", str(ROOT / "demo_work"))
sys.path.insert(0, str(ROOT))

import config  # noqa: E402
from utils import common, privacy  # noqa: E402
from utils.audit import audit_paths  # noqa: E402

TARGET_EPSILON = 8.0  # the private GAN's strict (valid) epsilon: single-digit, as in the paper's best model
# The private GAN's epochs: two thirds of the non-private GAN's updates, what is left of the 20 minutes (a private
# step costs 1.3x a plain one here). Under DP no recipe of the study switched its labels on within such budgets
# (README), so more would not change the table, only the time.
PRIVATE_EPOCHS = max(1, config.EPOCHS * 2 // 3)
THRESH = config.THRESH


def run(step, total, title, args, done=None):
    head = f"[{step}/{total}] {title}"
    if done is not None and done():
        print(f"{head}: done already, reused", flush=True)
        return
    print(f"{head} ...", flush=True)
    start = time.time()
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)
    print(f"{head}: finished in {time.time() - start:.0f} s", flush=True)


def gan_done(trial, epochs):
    return (common.gan_model_dir(trial) / f"epoch_{epochs - 1}.pth").is_file()


def gan_args(trial, noisem, epochs):
    args = ["run_gan.py", "--trial", trial, "--noisem", str(noisem), "--epochs", str(epochs)]
    return args + ["--resume"] if common.gan_results_dir(trial).exists() else args


def main():
    common.print_setup("demo")
    n_train = config.N_PATIENTS["train"] * config.PATCHES_PER_PATIENT
    noisem = privacy.noise_for_target_epsilon(TARGET_EPSILON, PRIVATE_EPOCHS, config.BATCH_SIZE, n_train,
                                              config.N_DISCR, "strict")
    noisem = math.ceil(noisem * 100) / 100  # a round number that still meets the target
    print(f"private GAN: noise multiplier {noisem} gives a strict epsilon <= {TARGET_EPSILON} after "
          f"{PRIVATE_EPOCHS} epochs (python -m utils.privacy --target_epsilon {TARGET_EPSILON} ...)", flush=True)
    trials = {"demo_nonprivate": (math.inf, config.EPOCHS), "demo_private": (noisem, PRIVATE_EPOCHS)}
    select = {t: ["--trial", t, "--epoch", str(epochs - 1), "--thresh", str(THRESH)] for t, (_, epochs) in
              trials.items()}
    names = {t: common.synthetic_name(t, epochs - 1, THRESH) for t, (_, epochs) in trials.items()}
    steps = [("synthetic TOF-MRA phantoms", ["make_phantoms.py"],
              lambda: all((config.DATA_DIR / s / f"{config.PATIENT_IDS[s][-1]}_mask.nii.gz").is_file()
                          for s in config.SPLITS)),
             ("training patches", ["extract_patches.py", "--split", "train"],
              lambda: common.patches_path("train").is_file()),
             ("test patches (for FID)", ["extract_patches.py", "--split", "test"],
              lambda: common.patches_path("test").is_file())]
    for trial, (sigma, epochs) in trials.items():
        steps.append((f"DP-GAN {trial} (noise {sigma}, {epochs} epochs)", gan_args(trial, sigma, epochs),
                      lambda t=trial, e=epochs: gan_done(t, e)))
    for trial, (_, epochs) in trials.items():
        steps.append((f"synthetic pairs of {trial}", ["generate_samples.py", *select[trial]],
                      lambda t=trial, e=epochs: common.synthetic_path(t, e - 1, THRESH).is_file()))
        steps.append((f"privacy audit of {trial}'s pairs", ["audit_privacy.py", *select[trial]],
                      lambda t=trial: audit_paths(names[t])[0].is_file()))
    for name, flags in [("real", ["--real"])] + [(names[t], select[t]) for t in trials]:
        steps.append((f"U-Nets on {name}", ["run_unet.py", *flags], None))
        steps.append((f"evaluation of {name}", ["eval_unet.py", *flags],
                      lambda n=name: common.result_paths(n)[1].is_file()))
    steps.append(("comparison table and figures", ["compare_results.py"], None))
    start = time.time()
    for i, (title, args, done) in enumerate(steps, 1):
        run(i, len(steps), title, args, done)
    print(f"demo finished in {(time.time() - start) / 60:.1f} min; outputs in {config.WORK_DIR}", flush=True)


if __name__ == "__main__":
    main()
