"""Time the evaluation metrics at paper size: DSC and bAHD on a 312 x 384 x 127 volume pair, mean pairwise SSIM
of 1,000 images of 96 x 96 (499,500 pairs), against the obvious alternatives.

The truth is a set of random winding tubes (~1% of the voxels); the prediction is the truth with voxels of its
surface removed and of its outer shell added at random, one stretch of vessel missed and a few false-positive
blobs. bAHD is also computed with scipy's Euclidean distance transform of the union box (the same exact sums).
SSIM is compared with skimage's structural_similarity over a sample of pairs, extrapolated to all pairs.
Run from the repository root: python benchmarks/bench_metrics.py [--repeats 3]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.metrics import structural_similarity

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils import metrics  # noqa: E402

SHAPE = (312, 384, 127)
SPACING = (0.5, 0.5, 0.7)


def vessel_pair(seed=0, n_tubes=70, steps=500):
    """(pred, truth) bool volumes of SHAPE: winding tubes and a noisy prediction of them."""
    rng = np.random.default_rng(seed)
    upper = np.array(SHAPE) - 1
    centreline = np.zeros(SHAPE, bool)
    for _ in range(n_tubes):
        point = rng.uniform(0.1, 0.9, 3) * upper
        direction = rng.normal(size=3)
        for _ in range(steps):
            direction += rng.normal(scale=0.25, size=3)
            direction /= np.linalg.norm(direction)
            point = np.clip(point + direction, 0, upper)
            centreline[tuple(point.astype(int))] = True
    truth = ndimage.binary_dilation(centreline)
    surface = truth & ~ndimage.binary_erosion(truth)
    shell = ndimage.binary_dilation(truth) & ~truth
    pred = (truth & ~(surface & (rng.random(SHAPE) < 0.25))) | (shell & (rng.random(SHAPE) < 0.25))
    pred[100:140, 150:190, 40:60] &= ~truth[100:140, 150:190, 40:60]  # a missed stretch of vessel
    for centre in rng.uniform(0.1, 0.9, (5, 3)) * upper:  # false-positive blobs
        x, y, z = (slice(int(c) - 2, int(c) + 3) for c in centre)
        pred[x, y, z] = True
    return pred, truth


def bahd_by_distance_transform(pred, truth, spacing):
    """The same bAHD from two exact Euclidean distance transforms of the union bounding box."""
    box = metrics._bounding_box(pred | truth)
    p, t = pred[box], truth[box]
    to_pred = ndimage.distance_transform_edt(~p, sampling=spacing)[t].sum()
    to_truth = ndimage.distance_transform_edt(~t, sampling=spacing)[p].sum()
    return (to_pred + to_truth) / (2 * np.count_nonzero(truth))


def patch_images(n, seed=1):
    """n grey 96 x 96 images in [0, 255]: smooth backgrounds with bright thin lines, like TOF patches."""
    rng = np.random.default_rng(seed)
    images = ndimage.gaussian_filter(rng.normal(size=(n, 96, 96)), (0, 4, 4)) * 400 + 60
    yy, xx = np.mgrid[:96, :96]
    for img in images:
        for _ in range(3):
            a, b, c = rng.normal(size=3)
            img[np.abs(a * xx + b * yy - c * 40 - 48 * (a + b)) < 1.5 * np.hypot(a, b)] += 150
    images += rng.normal(scale=5, size=images.shape)
    return np.clip(images, 0, 255).astype(np.float32)


def timed(fn, repeats):
    seconds, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        seconds.append(time.perf_counter() - start)
    return min(seconds), statistics.median(seconds), value


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timings of DSC and bAHD (min and median shown)")
    parser.add_argument("--ssim-images", type=int, default=1000)
    parser.add_argument("--skimage-pairs", type=int, default=2000, help="pairs timed with skimage, extrapolated")
    parser.add_argument("--skip-edt", action="store_true", help="skip the distance-transform form of bAHD")
    args = parser.parse_args()

    rows = []
    pred, truth = vessel_pair()
    print(f"volume {SHAPE}: truth {truth.mean():.2%} of voxels, prediction {pred.mean():.2%}", flush=True)
    best, median, dsc = timed(lambda: metrics.dice(pred, truth), args.repeats)
    rows.append(("DSC, 312x384x127", best, median, f"DSC {dsc:.4f}"))
    best, median, bahd = timed(lambda: metrics.balanced_average_hausdorff(pred, truth, SPACING), args.repeats)
    rows.append(("bAHD (k-d tree on surfaces)", best, median, f"bAHD {bahd:.6f} mm"))
    if not args.skip_edt:
        best, median, edt = timed(lambda: bahd_by_distance_transform(pred, truth, SPACING), 1)
        rows.append(("bAHD (distance transforms)", best, median, f"bAHD {edt:.6f} mm, |diff| {abs(edt - bahd):.1e}"))

    images = patch_images(args.ssim_images)
    n_pairs = len(images) * (len(images) - 1) // 2
    data_range = float(images.max() - images.min())
    best, median, ssim = timed(lambda: metrics.mean_pairwise_ssim(images), 1)
    rows.append((f"mean pairwise SSIM, {len(images)} images", best, median, f"{n_pairs} pairs, SSIM {ssim:.6f}"))
    rng = np.random.default_rng(2)
    pairs = rng.choice(len(images), (args.skimage_pairs, 2))
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    start = time.perf_counter()
    for i, j in pairs:
        structural_similarity(images[i], images[j], data_range=data_range)
    skimage_seconds = (time.perf_counter() - start) / len(pairs) * n_pairs
    rows.append((f"skimage, extrapolated from {len(pairs)} pairs", skimage_seconds, skimage_seconds,
                 f"ratio {skimage_seconds / best:.0f}x"))
    subset = images[:40].astype(np.float64)
    reference = np.mean([structural_similarity(subset[i], subset[j], data_range=data_range)
                         for i in range(len(subset)) for j in range(i + 1, len(subset))])
    difference = abs(metrics.mean_pairwise_ssim(subset, data_range) - reference)
    rows.append(("SSIM check: 40 images vs skimage", float("nan"), float("nan"), f"|diff| {difference:.1e}"))

    print(f"\n{'metric':<40} {'best s':>9} {'median s':>9}  note")
    for name, best, median, note in rows:
        print(f"{name:<40} {best:9.3f} {median:9.3f}  {note}")


if __name__ == "__main__":
    main()
