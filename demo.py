"""`make demo`: the whole experiment at a small scale on the CPU, one numbered step after another.

Runs the real scripts with the demo preset (DPGAN_PRESET=demo) in demo_data/ and demo_work/:
phantoms -> patches -> a non-private and a private DP-WGAN -> synthetic sets (and their release bundles) ->
membership-inference audit of each set and of a copy of the training patches (the positive control) -> U-Nets
on real and on each synthetic set -> evaluation -> one side-by-side table. A step whose output exists is skipped, so
running it again reuses what is there (delete demo_work/ to start over). `make utility` runs the same steps with
presets/utility.py (a longer recipe; outputs in utility_work/), its trials named after the preset.

Steps that do not depend on each other (the two GANs; the U-Nets) run side by side, each on its share of the
cores (a GAN's small layers use one core well and two poorly), with their output in demo_work/logs/.
"""

import math
import os
import re
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
# The private GAN's epochs: two thirds of the non-private GAN's updates, so that it ends with the non-private one
# it trains beside (a private step costs about 1.3x a plain one here). Under DP no recipe of the study switched its
# labels on within such budgets (README), so more would not change the table, only the time.
PRIVATE_EPOCHS = max(1, config.EPOCHS * 2 // 3)
THRESH = config.THRESH
MEMORISER = common.patches_path("train").stem  # the audit's name of the training patches as a "synthetic set"


def run_stage(first, total, stage):
    """Run the stage's steps (title, args, done) that are not done yet: one in the foreground, several side by
    side with the cores shared out and their output in logs/. A failed step stops the demo with its log's end."""
    heads = [f"[{first + i}/{total}] {title}" for i, (title, _, _) in enumerate(stage)]
    todo = []
    for head, (title, args, done) in zip(heads, stage):
        if done is not None and done():
            print(f"{head}: done already, reused", flush=True)
        else:
            todo.append((head, title, args))
    if len(todo) == 1:
        head, _, args = todo[0]
        print(f"{head} ...", flush=True)
        start = time.time()
        subprocess.run([sys.executable, *args], cwd=ROOT, check=True)
        print(f"{head}: finished in {time.time() - start:.0f} s", flush=True)
        return
    threads = str(max(1, (os.cpu_count() or 1) // len(todo)))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    logs = config.WORK_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    running = []
    start = time.time()
    for head, title, args in todo:
        log = logs / (re.sub(r"[^A-Za-z0-9.-]+", "_", title).strip("_") + ".log")
        print(f"{head} ... (side by side, {threads} thread(s); output in {log})", flush=True)
        with open(log, "w") as out:
            running.append((head, log, subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=out,
                                                        stderr=subprocess.STDOUT)))
    failed = None
    while running:  # report each step when it ends, in whatever order
        time.sleep(1)
        for item in [r for r in running if r[2].poll() is not None]:
            running.remove(item)
            head, log, process = item
            if process.returncode != 0:
                failed = failed or (head, log, process.returncode)
            else:
                print(f"{head}: finished in {time.time() - start:.0f} s", flush=True)
    if failed:
        head, log, code = failed
        print(f"{head}: FAILED (exit {code}); the end of {log}:", flush=True)
        print("".join(log.read_text(errors="replace").replace("\r", "\n").splitlines(True)[-20:]), flush=True)
        raise SystemExit(code)


def gan_done(trial, epochs):
    return (common.gan_model_dir(trial) / f"epoch_{epochs - 1}.pth").is_file()


def gan_args(trial, noisem, epochs):
    args = ["run_gan.py", "--trial", trial, "--noisem", str(noisem), "--epochs", str(epochs)]
    return args + ["--resume"] if common.gan_results_dir(trial).exists() else args


def main():
    common.print_setup("demo")  # `make utility` runs this with DPGAN_PRESET=utility
    n_train = config.N_PATIENTS["train"] * config.PATCHES_PER_PATIENT
    noisem = privacy.noise_for_target_epsilon(TARGET_EPSILON, PRIVATE_EPOCHS, config.BATCH_SIZE, n_train,
                                              config.N_DISCR, "strict")
    noisem = math.ceil(noisem * 100) / 100  # a round number that still meets the target
    print(f"private GAN: noise multiplier {noisem} gives a strict epsilon <= {TARGET_EPSILON} after "
          f"{PRIVATE_EPOCHS} epochs (python -m utils.privacy --target_epsilon {TARGET_EPSILON} ...)", flush=True)
    trials = {f"{config.PRESET}_nonprivate": (math.inf, config.EPOCHS),
              f"{config.PRESET}_private": (noisem, PRIVATE_EPOCHS)}
    select = {t: ["--trial", t, "--epoch", str(epochs - 1), "--thresh", str(THRESH)] for t, (_, epochs) in
              trials.items()}
    names = {t: common.synthetic_name(t, epochs - 1, THRESH) for t, (_, epochs) in trials.items()}
    stages = [[("synthetic TOF-MRA phantoms", ["make_phantoms.py"],
                lambda: all((config.DATA_DIR / s / f"{config.PATIENT_IDS[s][-1]}_mask.nii.gz").is_file()
                            for s in config.SPLITS))],
              [("training patches", ["extract_patches.py", "--split", "train"],
                lambda: common.patches_path("train").is_file())],
              [("test patches (for FID)", ["extract_patches.py", "--split", "test"],
                lambda: common.patches_path("test").is_file())],
              [(f"DP-GAN {trial} (noise {sigma}, {epochs} epochs)", gan_args(trial, sigma, epochs),
                lambda t=trial, e=epochs: gan_done(t, e)) for trial, (sigma, epochs) in trials.items()]]
    for trial, (_, epochs) in trials.items():
        stages.append([(f"synthetic pairs of {trial}", ["generate_samples.py", *select[trial]],
                        lambda t=trial, e=epochs: common.synthetic_path(t, e - 1, THRESH).is_file())])
        stages.append([(f"privacy audit of {trial}'s pairs", ["audit_privacy.py", *select[trial]],
                        lambda t=trial: audit_paths(names[t])[0].is_file())])
    # positive control of the audit: a "synthetic set" that is a copy of the training patches must be caught
    stages.append([("privacy audit of a copy of the training patches (positive control)",
                    ["audit_privacy.py", "--synthetic", str(common.patches_path("train"))],
                    lambda: audit_paths(MEMORISER)[0].is_file())])
    sets = [("real", ["--real"])] + [(names[t], select[t]) for t in trials]
    stages.append([(f"U-Nets on {name}", ["run_unet.py", *flags], None) for name, flags in sets[:2]])
    stages.append([(f"U-Nets on {name}", ["run_unet.py", *flags], None) for name, flags in sets[2:]])
    stages += [[(f"evaluation of {name}", ["eval_unet.py", *flags], lambda n=name: common.result_paths(n)[1].is_file())]
               for name, flags in sets]
    stages.append([("comparison table and figures", ["compare_results.py"], None)])
    total = sum(len(stage) for stage in stages)
    start, first = time.time(), 1
    for stage in stages:
        run_stage(first, total, stage)
        first += len(stage)
    control = common.load_json(audit_paths(MEMORISER)[0], "audit of the positive control")
    print(f"audit's positive control: a copy of the training patches scores MIA AUC {control['mia_auc']:.3f} (a "
          f"working attack finds it: >= 0.95), its control AUC {control['control_auc']:.3f}", flush=True)
    print(f"demo finished in {(time.time() - start) / 60:.1f} min; outputs in {config.WORK_DIR}", flush=True)


if __name__ == "__main__":
    main()
