"""Whole generator updates of the paper's model (run_gan.generator_update: Poisson batch gathering, fake batches,
n_discr critic steps, the generator step, bookkeeping), private (strict, noise 1) and non-private, timed in one
process on random patches, and the paper's 50-epoch schedule (64,050 updates: 41,000 patches, batch 32)
projected from the measured rate.

    python benchmarks/bench_gan_update.py                        # paper model, batch 32, n_discr 5; JSON last
    python benchmarks/bench_gan_update.py --ndf 16 --ngf 8 --updates 5 --device auto
On a 2-core CPU one private update of the paper's model takes minutes: the default times 2 updates of each kind
after one warm-up update.
"""

import argparse
import json
import statistics
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_critic_step import device_name, timed  # noqa: E402  (this folder: the critic benchmark's timing)

import config  # noqa: E402
import run_gan  # noqa: E402
from utils.common import patches_path, resolve_device  # noqa: E402
from utils.gan import GanTrial  # noqa: E402

PAPER_UPDATES = 50 * round(41_000 / 32)  # 64,050


def write_random_patches(n, size, seed=0):
    rng = np.random.default_rng(seed)
    path = patches_path("train")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, img=rng.normal(100, 20, (n, size, size)).astype(np.float32),
             label=(rng.random((n, size, size)) < 0.02).astype(np.uint8), patient=np.array(["p0"] * n),
             centre=np.zeros((n, 3), np.int32))


@contextmanager
def random_patches(n, size):
    """config.DATA_DIR and WORK_DIR in a temporary folder whose training patches file holds n random patches, for
    the duration of the block."""
    saved = config.DATA_DIR, config.WORK_DIR
    with tempfile.TemporaryDirectory() as tmp:
        config.DATA_DIR, config.WORK_DIR = Path(tmp) / "data", Path(tmp) / "work"
        try:
            write_random_patches(n, size)
            yield
        finally:
            config.DATA_DIR, config.WORK_DIR = saved


def model_flags(ndf, ngf, batch_size, n_discr, device, grad_sample_mode):
    """run_gan.py flags of a model and its device."""
    return ["--ndf", str(ndf), "--ngf", str(ngf), "--batch_size", str(batch_size), "--n_discr", str(n_discr),
            "--device", str(device), "--grad_sample_mode", grad_sample_mode]


def start_trial(flags):
    """(trial, args) of run_gan.py flags (the first: the trial's name), its first epoch begun."""
    args = run_gan.parse_args(["--trial", flags[0], *flags[1:]])
    trial = GanTrial(args)
    trial.begin_epoch(0)
    return trial, args


def time_updates(flags, updates, device):
    """Median seconds per generator update after one warm-up update."""
    return time_trial_updates(*start_trial(flags), updates, device)


def time_trial_updates(trial, args, updates, device):
    times = [timed(lambda: run_gan.generator_update(trial, args), device) for _ in range(updates + 1)]
    trial.check_finite()
    return statistics.median(times[1:])  # the first warms up


def projected_hours(seconds_per_update):
    return round(seconds_per_update * PAPER_UPDATES / 3600, 2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ndf", type=int, default=96)
    p.add_argument("--ngf", type=int, default=96)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--n_discr", type=int, default=5)
    p.add_argument("--updates", type=int, default=2, help="timed updates of each kind (after one warm-up)")
    p.add_argument("--n_patches", type=int, default=2000, help="random patches to sample from")
    p.add_argument("--device", default="cpu", help="cpu (default), auto, cuda, ...")
    p.add_argument("--grad_sample_mode", default=config.GRAD_SAMPLE_MODE)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    name = device_name(device)
    common = model_flags(args.ndf, args.ngf, args.batch_size, args.n_discr, device, args.grad_sample_mode)
    with random_patches(args.n_patches, config.PATCH_SIZE):
        plain = time_updates(["plain", "--noisem", "inf", *common], args.updates, device)
        private = time_updates(["private", "--noisem", "1", *common], args.updates, device)
    print(f"device: {name}; model ndf {args.ndf} ngf {args.ngf}, batch {args.batch_size}, n_discr {args.n_discr}, "
          f"engine {args.grad_sample_mode}")
    for label, seconds in (("non-private", plain), ("private (strict)", private)):
        print(f"{label}: {seconds:.3f} s per generator update, {1 / seconds:.3f} updates/s; the paper's "
              f"{PAPER_UPDATES:,} updates: {seconds * PAPER_UPDATES / 3600:.1f} h")
    print(json.dumps({"device": name, "seconds_per_update_private": round(private, 4),
                      "seconds_per_update_plain": round(plain, 4), "ratio": round(private / plain, 3),
                      "projected_hours_private": projected_hours(private),
                      "projected_hours_plain": projected_hours(plain)}))


if __name__ == "__main__":
    main()
