"""What a U-Net learns from a set of pairs, in five numbers per set: how much of it is labelled vessel, how much of it
is bright, and how often bright means vessel. A U-Net trained on pairs where bright pixels are more often vessel than
in the real patches marks more of a real volume's bright non-vessel tissue as vessel.

Each set is an .npz with `img` and `label` (N x P x P, or x 1): a synthetic set of generate_samples.py or a patches
file of extract_patches.py. Statistics of the training patches are computed on them without noise: internal, never
to be shared (the table says so). Images are min-max scaled per patch, as the U-Net's input is, and "bright" is
above the middle of that range.

    .venv/bin/python studies/set_statistics.py demo_work/patches/train_patches.npz demo_work/synthetic/*.npz
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.common import minmax_scale  # noqa: E402

BRIGHT = 0.5  # of the per-patch min-max range


def set_statistics(img, label):
    """{label_fraction, bright_fraction, bright_labelled, img_in_label, img_outside, no_vessel_patches} of a set."""
    scaled = minmax_scale(img[..., 0] if img.ndim == 4 else img, 0, 1)
    vessel = (label[..., 0] if label.ndim == 4 else label) > 0
    bright = scaled > BRIGHT
    return {"label_fraction": float(vessel.mean()), "bright_fraction": float(bright.mean()),
            "bright_labelled": float(vessel[bright].mean()) if bright.any() else float("nan"),
            "img_in_label": float(scaled[vessel].mean()) if vessel.any() else float("nan"),
            "img_outside": float(scaled[~vessel].mean()),
            "no_vessel_patches": float(np.mean(vessel.reshape(len(vessel), -1).sum(1) == 0))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sets", nargs="+", type=Path, help=".npz files with img and label")
    args = parser.parse_args(argv)
    print("| set | pairs | label vessel fraction | bright fraction | bright pixels labelled vessel | image in label | "
          "image outside | patches without vessel |\n|---|---|---|---|---|---|---|---|")
    rows = {}
    for path in args.sets:
        with np.load(path) as arrays:
            stats = set_statistics(arrays["img"], arrays["label"])
            n = len(arrays["label"])
        internal = " (internal: training patches)" if path.name.startswith("train_patches") else ""
        print(f"| {path.name}{internal} | {n} | {stats['label_fraction']:.4f} | {stats['bright_fraction']:.4f} | "
              f"{stats['bright_labelled']:.3f} | {stats['img_in_label']:.3f} | {stats['img_outside']:.3f} | "
              f"{stats['no_vessel_patches']:.3f} |")
        rows[str(path)] = stats
    return rows


if __name__ == "__main__":
    main()
