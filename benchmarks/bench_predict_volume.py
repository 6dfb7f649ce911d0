"""Benchmark: segment and score one paper-size volume (312 x 384 x 127) with the paper's U-Net on this machine.

    python benchmarks/bench_predict_volume.py [--device cpu] [--batch_size 16] [--repeats 1]

The volume is synthetic (random TOF-like intensities, an ellipsoidal brain mask of about 256 x 330 voxels
in-plane, tube-shaped "vessels" as the label) and the U-Net (kernels 32..512) is randomly initialised, so the
output is meaningless; only the times count. A random U-Net's thresholded output is no realistic segmentation, so
DSC and bAHD are timed on a stand-in prediction of realistic size: the label shifted by one voxel plus 0.05 %
scattered false positives. Prints the number of tiles, the prediction time (all tiles of all slices batched,
config.PREDICTION_BATCH_CPU or _GPU per pass) and the time of DSC + bAHD. The evaluation target: under 30 s in all.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import config  # noqa: E402
from model import UNet  # noqa: E402
from utils.common import resolve_device  # noqa: E402
from utils.inference import brain_box_tiles, predict_volume, score  # noqa: E402


def synthetic_volume(shape, seed=0):
    """(img, label, mask): gamma noise, an ellipsoid brain of the phantoms' proportions (utils/phantoms.py Head:
    semi-axes 0.41 and 0.43 of the field of view in-plane, longer than the slab in z, so every slice has brain),
    and a dozen wavy tubes along z as vessels."""
    rng = np.random.default_rng(seed)
    img = (rng.gamma(4.0, 40.0, size=shape)).astype(np.float32)
    x, y, z = np.ogrid[:shape[0], :shape[1], :shape[2]]
    centre = np.array(shape) / 2 + (0, 0, 0.1 * shape[2])
    semi = (0.41 * shape[0], 0.43 * shape[1], 0.8 * shape[2])
    mask = ((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2 + ((z - centre[2]) / semi[2]) ** 2 <= 1
    label = np.zeros(shape, bool)
    zs = np.arange(shape[2])
    for k in range(12):
        radius = rng.uniform(1.0, 3.0)
        phase = rng.uniform(0, 2 * np.pi)
        cx = centre[0] + 0.6 * semi[0] * np.cos(phase + k) + 8 * np.sin(zs / rng.uniform(6, 20))
        cy = centre[1] + 0.6 * semi[1] * np.sin(phase + k) + 8 * np.cos(zs / rng.uniform(6, 20))
        for zi in zs:
            label[:, :, zi] |= ((x[:, :, 0] - cx[zi]) ** 2 + (y[:, :, 0] - cy[zi]) ** 2) <= radius ** 2
    label &= mask
    img[label] = rng.normal(800, 60, size=int(label.sum())).astype(np.float32)
    return img, label.astype(np.uint8), mask.astype(np.uint8)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=[312, 384, 127], help="volume shape x y z")
    p.add_argument("--device", default="cpu", help="cpu (the target), cuda, auto")
    p.add_argument("--batch_size", type=int, default=None,
                   help="tiles per forward pass (default: config.PREDICTION_BATCH_CPU or _GPU)")
    p.add_argument("--repeats", type=int, default=1, help="time the prediction this many times (report each)")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    img, label, mask = synthetic_volume(tuple(args.shape))
    n_tiles = sum(len(brain_box_tiles(mask[:, :, z])) for z in range(mask.shape[2]))
    n_slices = int(np.any(mask, axis=(0, 1)).sum())
    torch.manual_seed(0)
    model = UNet(kernels=(32, 64, 128, 256, 512)).to(device).eval()
    meta = {"mean": 100.0, "sd": 60.0}
    print(f"volume {tuple(args.shape)}, {n_slices} slices with brain, {n_tiles} tiles of 96 x 96; U-Net "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; device {device}, "
          f"{torch.get_num_threads()} torch threads, batch {args.batch_size or 'default'}", flush=True)

    rng = np.random.default_rng(1)
    stand_in = (np.roll(label, 1, axis=0) | (rng.random(label.shape) < 5e-4)).astype(np.float32)
    for repeat in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        prob = predict_volume(model, meta, img, mask, device, args.batch_size)
        if device.type == "cuda":
            torch.cuda.synchronize()
        predict_s, predict_cpu = time.perf_counter() - start, time.process_time() - cpu_start
        start = time.perf_counter()
        scores = score(stand_in, label, config.VOXEL_SPACING)
        score_s = time.perf_counter() - start
        print(f"run {repeat + 1}: predict {predict_s:.1f} s ({1000 * predict_s / max(n_tiles, 1):.1f} ms per tile; "
              f"{predict_cpu:.0f} CPU-seconds over all threads), "
              f"DSC + bAHD {score_s:.1f} s (stand-in: {scores['n_pred']} predicted, {scores['n_truth']} true voxels, "
              f"DSC {scores['dsc']:.3f}, bAHD {scores['bahd']:.3f} mm), total {predict_s + score_s:.1f} s "
              f"(target < 30 s); U-Net prediction mean {prob.mean():.3f}", flush=True)


if __name__ == "__main__":
    main()
