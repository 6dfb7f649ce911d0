"""`make demo`: the whole experiment at a small scale on the CPU, one numbered step after another.

Runs the real scripts with the demo preset (DPGAN_PRESET=demo) in demo_data/ and demo_work/:
phantoms (skull-stripped as they are read, config.SKULL_STRIP) -> patches -> a GAN on "public" phantoms (other
patients: they stand in for a public labelled dataset) -> two GANs started from the public one (run_gan.py
--init_from) and trained on the training patches with the same batch and number of updates, one with DP and one
without (whose critic learns at config.REFERENCE_LRD, about the pace of the DP critic), so that their rows differ by
privacy, not by start or budget -> synthetic sets (and their release bundles) ->
membership-inference audit of each set and of a copy of the training patches (the positive control) -> U-Nets
on real and on each synthetic set -> evaluation -> one side-by-side table. A step whose output exists is skipped, so
running it again reuses what is there (delete demo_work/ to start over). `make utility` runs the same steps with
presets/utility.py (a longer recipe; outputs in utility_work/), its trials named after the preset. `make curve`
(`demo.py --curve`, presets/curve.py) makes the same data and public GAN and then runs sweep.py's grid of noise
multipliers and seeds, every job trained on from the public GAN as the demo's two GANs are.

Steps that do not depend on each other run side by side, each on its share of the cores (a GAN's small layers use
one core well and two poorly), with their output in demo_work/logs/.
"""

import argparse
import math
import os
import re
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("DPGAN_PRESET", "demo")
os.environ.setdefault("DPGAN_DATA_DIR", str(ROOT / "demo_data"))
os.environ.setdefault("DPGAN_WORK_DIR", str(ROOT / "demo_work"))
sys.path.insert(0, str(ROOT))

import config  # noqa: E402
from utils import common, data, phantoms, privacy  # noqa: E402
from utils.audit import audit_paths  # noqa: E402
from utils.sweep import reference_flags  # noqa: E402

TARGET_EPSILON = 8.0  # the private GAN's strict (valid) epsilon: single-digit, as in the paper's best model
# The epochs on the training patches of the private GAN and of its non-private reference, both trained on from the
# public GAN: a third of the public GAN's. Started cold, no private recipe of the study learned anything
# (docs/2026-11-23-recipe-study-raw-scans.md);
# started from public data, the DP steps adapt it to the patients, and fewer of them need less noise for the same
# epsilon. The reference gets the same start and as many updates, so the rows compare privacy, not budgets.
PRIVATE_EPOCHS = max(1, config.EPOCHS // 3)
FINETUNE_BATCH = config.FINETUNE_BATCH_SIZE or config.BATCH_SIZE
THRESH = config.THRESH
MEMORISER = common.patches_path("train").stem  # the audit's name of the training patches as a "synthetic set"
# Public data: phantoms of another seed (other patients, none of the training, validation or test ones) stand in for
# a public labelled TOF-MRA dataset. Epsilon covers the training patches only; it holds because these are public.
PUBLIC_PHANTOM_SEED = config.PHANTOM_SEED + 1
PUBLIC_TRIAL = f"{config.PRESET}_public"

# One step of a stage: a script with its arguments, a test of whether its output exists (None: always run) and
# environment variables that differ from the demo's (the public data's folders).
Step = namedtuple("Step", "title args done env", defaults=(None, None))


def run_stage(first, total, stage):
    """Run the stage's Steps that are not done yet: one in the foreground, several side by side with the cores
    shared out and their output in logs/. A failed step stops the demo with its log's end."""
    heads = [f"[{first + i}/{total}] {step.title}" for i, step in enumerate(stage)]
    todo = []
    for head, step in zip(heads, stage):
        if step.done is not None and step.done():
            print(f"{head}: done already, reused", flush=True)
        else:
            todo.append((head, step))
    if not todo:
        return
    if len(todo) == 1:
        head, step = todo[0]
        print(f"{head} ...", flush=True)
        start = time.time()
        subprocess.run([sys.executable, *step.args], cwd=ROOT, env=dict(os.environ, **(step.env or {})), check=True)
        print(f"{head}: finished in {time.time() - start:.0f} s", flush=True)
        return
    threads = str(max(1, (os.cpu_count() or 1) // len(todo)))
    logs = config.WORK_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    running = []
    start = time.time()
    for head, step in todo:
        log = logs / (re.sub(r"[^A-Za-z0-9.-]+", "_", step.title).strip("_") + ".log")
        print(f"{head} ... (side by side, {threads} thread(s); output in {log})", flush=True)
        env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, **(step.env or {}))
        with open(log, "w") as out:
            running.append((head, log, subprocess.Popen([sys.executable, *step.args], cwd=ROOT, env=env, stdout=out,
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


def gan_done(trial, epochs, work_dir=None):
    return checkpoint(trial, epochs - 1, work_dir).is_file()


def checkpoint(trial, epoch, work_dir=None):
    return common.gan_model_dir(trial, work_dir) / f"epoch_{epoch}.pth"


def gan_args(trial, noisem, epochs, work_dir=None):
    args = ["run_gan.py", "--trial", trial, "--noisem", str(noisem), "--epochs", str(epochs)]
    return args + ["--resume"] if common.gan_results_dir(trial, work_dir).exists() else args


def public_env():
    """The folders of the public data (beside the demo's): what differs in the environment of its steps."""
    return {"DPGAN_DATA_DIR": str(config.DATA_DIR.with_name(config.DATA_DIR.name + "_public")),
            "DPGAN_WORK_DIR": str(config.WORK_DIR / "public")}


def public_start():
    """The public GAN's last checkpoint: where every GAN trained on the patients starts."""
    return checkpoint(PUBLIC_TRIAL, config.EPOCHS - 1, public_env()["DPGAN_WORK_DIR"])


def finetune_flags():
    """run_gan.py flags of every GAN trained on the patients (the demo's two, the curve's jobs): the public start
    and the fine-tuning batch."""
    return ["--init_from", str(public_start()), "--batch_size", str(FINETUNE_BATCH)]


def phantoms_done(data_dir, splits):
    last_masks = [data.patient_paths(s, phantoms.phantom_ids(s)[-1], data_dir)["mask"] for s in splits]
    return lambda: all(path.is_file() for path in last_masks)


def data_stages():
    """Phantoms (the patients' and the public ones) and the patches of the GANs and of FID, in order."""
    public = public_env()
    public_patches = Path(public["DPGAN_WORK_DIR"]) / "patches" / common.patches_path("train").name
    return [[Step("synthetic TOF-MRA phantoms", ["make_phantoms.py"], phantoms_done(config.DATA_DIR, config.SPLITS))],
            [Step("public phantoms (other patients; they stand in for a public dataset)",
                  ["make_phantoms.py", "--splits", "train", "--seed", str(PUBLIC_PHANTOM_SEED)],
                  phantoms_done(public["DPGAN_DATA_DIR"], ["train"]), public)],
            [Step("training patches", ["extract_patches.py", "--split", "train"],
                  lambda: common.patches_path("train").is_file())],
            [Step("public patches", ["extract_patches.py", "--split", "train"], public_patches.is_file, public)],
            [Step("test patches (for FID)", ["extract_patches.py", "--split", "test"],
                  lambda: common.patches_path("test").is_file())]]


def public_gan():
    public = public_env()
    return Step(f"DP-GAN {PUBLIC_TRIAL} (noise inf, {config.EPOCHS} epochs on public phantoms)",
                gan_args(PUBLIC_TRIAL, math.inf, config.EPOCHS, public["DPGAN_WORK_DIR"]),
                lambda: gan_done(PUBLIC_TRIAL, config.EPOCHS, public["DPGAN_WORK_DIR"]), public)


def demo_stages(noisem):
    """The demo's stages, in order: lists of Steps that may run side by side."""
    private, nonprivate = f"{config.PRESET}_private", f"{config.PRESET}_nonprivate"
    trials = {nonprivate: (math.inf, PRIVATE_EPOCHS), private: (noisem, PRIVATE_EPOCHS)}
    select = {t: ["--trial", t, "--epoch", str(epochs - 1), "--thresh", str(THRESH)] for t, (_, epochs) in
              trials.items()}
    names = {t: common.synthetic_name(t, epochs - 1, THRESH) for t, (_, epochs) in trials.items()}

    def gan(trial):
        sigma, epochs = trials[trial]
        return Step(f"DP-GAN {trial} (noise {sigma}, {epochs} epochs from the public GAN)",
                    gan_args(trial, sigma, epochs) + finetune_flags() + reference_flags(sigma, config.REFERENCE_LRD),
                    lambda: gan_done(trial, epochs))

    def synthesis_and_audit(trial):
        epochs = trials[trial][1]
        return [[Step(f"synthetic pairs of {trial}", ["generate_samples.py", *select[trial]],
                      lambda: common.synthetic_path(trial, epochs - 1, THRESH).is_file())],
                [Step(f"privacy audit of {trial}'s pairs", ["audit_privacy.py", *select[trial]],
                      lambda: audit_paths(names[trial])[0].is_file())]]

    def unets(name, flags):
        return Step(f"U-Nets on {name}", ["run_unet.py", *flags])

    sets = [("real", ["--real"])] + [(names[t], select[t]) for t in trials]
    stages = [*data_stages(),
              # the real-data U-Net trains beside the public GAN; both GANs of the training patches start from it
              [public_gan(), unets(*sets[0])],
              [gan(nonprivate), gan(private)],
              *synthesis_and_audit(nonprivate),
              *synthesis_and_audit(private),
              # positive control of the audit: a "synthetic set" that is a copy of the training patches must be caught
              [Step("privacy audit of a copy of the training patches (positive control)",
                    ["audit_privacy.py", "--synthetic", str(common.patches_path("train"))],
                    lambda: audit_paths(MEMORISER)[0].is_file())],
              [unets(*sets[1]), unets(*sets[2])]]
    stages += [[Step(f"evaluation of {name}", ["eval_unet.py", *flags],
                     lambda n=name: common.result_paths(n)[1].is_file())] for name, flags in sets]
    stages.append([Step("comparison table and figures", ["compare_results.py"])])
    return stages


def curve_stages(max_parallel):
    """`make curve`: the demo's data and public GAN, then sweep.py's jobs (config.NOISE_MULTIPLIERS x GAN_SEEDS),
    each trained on the patients from the public GAN with the demo's recipe (its epochs and batch), so that every
    point of the curve, the non-private one too, has the same start and updates; then the tables and figures."""
    sweep = ["sweep.py", "--executor", "local", "--max_parallel", str(max_parallel), "--epochs", str(PRIVATE_EPOCHS),
             *finetune_flags()]
    noises = ", ".join(f"{n:g}" for n in config.NOISE_MULTIPLIERS)
    return [*data_stages(), [public_gan()],
            [Step(f"the curve's GANs, synthetic sets, audits and U-Nets (sweep.py: noise {noises} x GAN seeds "
                  f"{', '.join(map(str, config.GAN_SEEDS))}, {max_parallel} side by side)", sweep)],
            [Step("comparison table and figures", ["compare_results.py"])]]


def run_stages(stages):
    total = sum(len(stage) for stage in stages)
    start, first = time.time(), 1
    for stage in stages:
        run_stage(first, total, stage)
        first += len(stage)
    return start


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--curve", action="store_true", help="`make curve`: the privacy-utility curve (curve_stages)")
    p.add_argument("--max_parallel", type=int, default=2, help="--curve: sweep jobs side by side")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.curve:
        common.print_setup("curve")
        start = run_stages(curve_stages(args.max_parallel))
        print(f"curve finished in {(time.time() - start) / 60:.1f} min; outputs in {config.WORK_DIR}", flush=True)
        return
    common.print_setup("demo")  # `make utility` runs this with DPGAN_PRESET=utility
    n_train = config.N_PATIENTS["train"] * config.PATCHES_PER_PATIENT
    noisem = privacy.noise_for_target_epsilon(TARGET_EPSILON, PRIVATE_EPOCHS, FINETUNE_BATCH, n_train,
                                              config.N_DISCR, "strict")
    noisem = math.ceil(noisem * 100) / 100  # a round number that still meets the target
    print(f"private GAN: noise multiplier {noisem} gives a strict epsilon <= {TARGET_EPSILON} after "
          f"{PRIVATE_EPOCHS} epochs at batch {FINETUNE_BATCH} (python -m utils.privacy --target_epsilon "
          f"{TARGET_EPSILON} ...), trained on from a GAN of public phantoms", flush=True)
    start = run_stages(demo_stages(noisem))
    control = common.load_json(audit_paths(MEMORISER)[0], "audit of the positive control")
    print(f"audit's positive control: a copy of the training patches scores MIA AUC {control['mia_auc']:.3f} (a "
          f"working attack finds it: >= 0.95), its control AUC {control['control_auc']:.3f}", flush=True)
    print(f"each GAN row is one GAN seed ({config.GAN_SEED}) and one U-Net seed ({config.UNET_SEED}): their spread "
          f"over GAN seeds, measured on the demo preset, is in docs/2026-12-03-recipe-study.md", flush=True)
    print(f"demo finished in {(time.time() - start) / 60:.1f} min; outputs in {config.WORK_DIR}", flush=True)


if __name__ == "__main__":
    main()
