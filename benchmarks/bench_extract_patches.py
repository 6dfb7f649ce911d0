"""Time patch extraction for one paper-size volume (312 x 384 x 127), in memory and from NIfTI files.

Builds a random volume with an ellipsoidal brain mask and thin vessel-like structures (about 2% of the
brain), then times drawing the centres and gathering config.PATCHES_PER_PATIENT image and label patches.
Run from the repository root: python benchmarks/bench_extract_patches.py [--repeats 5]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import config  # noqa: E402
from utils.data import load_patient, patient_paths  # noqa: E402
from utils.patches import draw_centres, gather_patches, patient_rng  # noqa: E402

SHAPE = (312, 384, 127)


def random_volume(seed=0):
    """img float32, label and mask uint8 of SHAPE: an ellipsoid brain with thin sheets of 'vessels' inside."""
    rng = np.random.default_rng(seed)
    centre = np.array(SHAPE) / 2
    radii = np.array(SHAPE) * np.array([0.45, 0.45, 0.48])
    x, y, z = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    mask = (((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
            + ((z - centre[2]) / radii[2]) ** 2 < 1)
    # The zero level set of a smooth random field is a set of thin winding sheets: vessel-like in count.
    coarse = rng.standard_normal((SHAPE[0] // 8, SHAPE[1] // 8, SHAPE[2] // 8)).astype(np.float32)
    field = ndimage.zoom(coarse, np.array(SHAPE) / np.array(coarse.shape), order=1)
    label = mask & (np.abs(field) < 0.02)
    img = rng.normal(200, 40, SHAPE).astype(np.float32) * mask + 600 * label
    return img.astype(np.float32), label.astype(np.uint8), mask.astype(np.uint8)


def extract(img, label, mask, seed):
    centres = draw_centres(label, mask, config.PATCHES_PER_PATIENT, config.VESSEL_PATCHES_PER_PATIENT,
                           patient_rng(seed, 0), "bench")
    return gather_patches(img, centres), gather_patches(label, centres)


def timed(fn, repeats):
    seconds = []
    for r in range(repeats):
        start = time.perf_counter()
        fn(r)
        seconds.append(time.perf_counter() - start)
    return min(seconds), statistics.median(seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    img, label, mask = random_volume()
    print(f"volume {SHAPE}: {int(mask.sum())} brain voxels, {int(label.sum())} vessel voxels; "
          f"{config.PATCHES_PER_PATIENT} patches of {config.PATCH_SIZE}x{config.PATCH_SIZE}, "
          f"{config.VESSEL_PATCHES_PER_PATIENT} vessel-centred (preset {config.PRESET})")

    best, median = timed(lambda r: extract(img, label, mask, r), args.repeats)
    print(f"extraction in memory:          best {best:.3f} s, median {median:.3f} s")

    with tempfile.TemporaryDirectory() as tmp:
        affine = np.diag([*config.VOXEL_SPACING, 1.0])
        for kind, array in zip(("img", "label", "mask"), (img, label, mask)):
            path = patient_paths("bench", "bench", tmp)[kind]
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array, affine), path)

        def load_and_extract(r):
            volume = load_patient("bench", "bench", tmp)
            extract(volume.img, volume.label, volume.mask, r)

        best, median = timed(load_and_extract, args.repeats)
        print(f"NIfTI reading plus extraction: best {best:.3f} s, median {median:.3f} s")


if __name__ == "__main__":
    main()
