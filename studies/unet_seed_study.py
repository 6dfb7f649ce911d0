"""Seed study of the U-Net trained on the real patches: how much its test DSC moves with the seeds,
and whether any U-Net collapses (predicts no vessel; see utils/unet.py HISTORY_FIELDS and utils/evaluation.py):
`retrained` counts the seeds that collapsed in training and were replaced (config.UNET_COLLAPSE_RETRIES),
`collapsed` the U-Nets that still predict no vessel on val.

A CPU's rounding acts like another seed, so robustness is measured over seeds. For every phantom seed it writes
the phantoms (as `make_phantoms.py --seed S`) in ROOT/data_S; for every U-Net seed U it extracts the training
patches, trains the preset's U-Net grid with config.UNET_SEED = U (as `run_unet.py --real`) and selects and tests
the best (as `eval_unet.py --real`) in ROOT/work_S/unet_seed_U. What exists is reused. Prints one row per pair of
seeds and the time taken, and writes the table to ROOT/unet_seed_study.csv.

    DPGAN_PRESET=demo .venv/bin/python studies/unet_seed_study.py --root unet_seed_study --threads 1
"""

import argparse
import csv
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DPGAN_PRESET", "demo")
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import config  # noqa: E402
import run_unet  # noqa: E402
from utils.common import load_json, patches_path, resolve_device, unet_dir  # noqa: E402
from utils.evaluation import select_and_test  # noqa: E402
from utils.patches import write_patches  # noqa: E402
from utils.phantoms import write_phantoms  # noqa: E402
from utils.unet import grid, run_name, run_unets  # noqa: E402

COLUMNS = ("phantom_seed", "unet_seed", "best_unet", "val_dsc", "test_dsc", "test2_dsc", "retrained", "collapsed",
           "seconds")


def study_row(phantom_seed, unet_seed, device):
    """Train and evaluate the U-Net grid for one pair of seeds (config.DATA_DIR / WORK_DIR already set)."""
    start = time.time()
    config.UNET_SEED = unet_seed
    if not patches_path("train").is_file():
        write_patches("train", config.PATCH_SEED)
    run_unets(run_unet.parse_args(["--real", "--device", str(device)]))
    selection = select_and_test("real", "python run_unet.py --real", device)
    collapsed = selection["collapsed"]
    retrained = sum(len(load_json(unet_dir("real") / run_name(params) / "meta.json", "U-Net meta")["collapsed_seeds"])
                    for params in grid())
    return {"phantom_seed": phantom_seed, "unet_seed": unet_seed, "best_unet": selection["best"].name,
            "val_dsc": selection["val"][selection["best"].name]["dsc_mean"],
            "test_dsc": selection["test"]["dsc_mean"], "test2_dsc": selection["test2"]["dsc_mean"],
            "retrained": retrained, "collapsed": f"{len(collapsed)} of {len(selection['val'])}",
            "seconds": round(time.time() - start)}


def print_table(rows):
    print(f"{'phantom seed':>12}  {'U-Net seed':>10}  {'val DSC':>7}  {'test DSC':>8}  {'test2 DSC':>9}  "
          f"{'retrained':>9}  {'collapsed':>9}  {'seconds':>7}")
    for r in rows:
        print(f"{r['phantom_seed']:>12}  {r['unet_seed']:>10}  {r['val_dsc']:>7.3f}  {r['test_dsc']:>8.3f}  "
              f"{r['test2_dsc']:>9.3f}  {r['retrained']:>9}  {r['collapsed']:>9}  {r['seconds']:>7}")
    for split in ("val", "test", "test2"):
        values = [r[f"{split}_dsc"] for r in rows]
        print(f"{split} DSC: min {min(values):.3f}, max {max(values):.3f}, range {max(values) - min(values):.3f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=Path("unet_seed_study"), help="folder for data, outputs and CSV")
    p.add_argument("--phantom_seeds", type=int, nargs="+", default=[config.PHANTOM_SEED, 7])
    p.add_argument("--unet_seeds", type=int, nargs="+", default=[config.UNET_SEED, 8, 9])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu (default), auto, cuda, ...")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"[unet_seed_study] preset: {config.PRESET} | root: {args.root} | device: {device}, {args.threads} "
          f"thread(s)", flush=True)
    start, rows = time.time(), []
    for phantom_seed in args.phantom_seeds:
        config.DATA_DIR = args.root / f"data_{phantom_seed}"
        write_phantoms(config.DATA_DIR, config.SPLITS, phantom_seed)
        for unet_seed in args.unet_seeds:
            config.WORK_DIR = args.root / f"work_{phantom_seed}" / f"unet_seed_{unet_seed}"
            rows.append(study_row(phantom_seed, unet_seed, device))
    csv_path = args.root / "unet_seed_study.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print_table(rows)
    print(f"{len(rows)} U-Net grids in {(time.time() - start) / 60:.1f} min; table: {csv_path}")


if __name__ == "__main__":
    main()
