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


def gan_done(trial):
    return (common.gan_model_dir(trial) / f"epoch_{config.EPOCHS - 1}.pth").is_file()


def gan_args(trial, noisem):
    args = ["run_gan.py", "--trial", trial, "--noisem", str(noisem)]
    return args + ["--resume"] if common.gan_results_dir(trial).exists() else args


def main():
    common.print_setup("demo")
    n_train = config.N_PATIENTS["train"] * config.PATCHES_PER_PATIENT
    noisem = privacy.noise_for_target_epsilon(TARGET_EPSILON, config.EPOCHS, config.BATCH_SIZE, n_train,
                                              config.N_DISCR, "strict")
    noisem = math.ceil(noisem * 100) / 100  # a round number that still meets the target
    print(f"private GAN: noise multiplier {noisem} gives a strict epsilon <= {TARGET_EPSILON} "
          f"(python -m utils.privacy --target_epsilon {TARGET_EPSILON} ...)", flush=True)
    epoch = config.EPOCHS - 1
    trials = {"demo_nonprivate": math.inf, "demo_private": noisem}
    inputs = ["real"] + [common.synthetic_name(t, epoch, THRESH) for t in trials]
    steps = [("synthetic TOF-MRA phantoms", ["make_phantoms.py"],
              lambda: all((config.DATA_DIR / s / f"{config.PATIENT_IDS[s][-1]}_mask.nii.gz").is_file()
                          for s in config.SPLITS)),
             ("training patches", ["extract_patches.py", "--split", "train"],
              lambda: common.patches_path("train").is_file()),
             ("test patches (for FID)", ["extract_patches.py", "--split", "test"],
              lambda: common.patches_path("test").is_file())]
    for trial, sigma in trials.items():
        steps.append((f"DP-WGAN {trial} (noise {sigma})", gan_args(trial, sigma), lambda t=trial: gan_done(t)))
    for trial in trials:
        steps.append((f"synthetic pairs of {trial}",
                      ["generate_samples.py", "--trial", trial, "--epoch", str(epoch), "--thresh", str(THRESH)],
                      lambda t=trial: common.synthetic_path(t, epoch, THRESH).is_file()))
    for trial in trials:
        steps.append((f"privacy audit of {trial}'s pairs",
                      ["audit_privacy.py", "--trial", trial, "--epoch", str(epoch), "--thresh", str(THRESH)],
                      lambda t=trial: audit_paths(common.synthetic_name(t, epoch, THRESH))[0].is_file()))
    for trial, name in zip([None, *trials], inputs):
        select = ["--real"] if trial is None else ["--trial", trial, "--epoch", str(epoch), "--thresh", str(THRESH)]
        steps.append((f"U-Nets on {name}", ["run_unet.py", *select], None))
        steps.append((f"evaluation of {name}", ["eval_unet.py", *select],
                      lambda n=name: common.result_paths(n)[1].is_file()))
    steps.append(("comparison table and figures", ["compare_results.py"], None))
    start = time.time()
    for i, (title, args, done) in enumerate(steps, 1):
        run(i, len(steps), title, args, done)
    print(f"demo finished in {(time.time() - start) / 60:.1f} min; outputs in {config.WORK_DIR}", flush=True)


if __name__ == "__main__":
    main()
