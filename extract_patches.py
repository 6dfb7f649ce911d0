"""Step 1: draw 2-D axial patches (half vessel-centred, half brain-centred) from every patient of a split.

Writes WORK_DIR/patches/<split>_patches.npz (img, label, patient, centre, skull_stripped) and a montage PNG beside
it. With config.SKULL_STRIP (the default, as the authors did) image and label are multiplied by the brain mask first.
Example: python extract_patches.py --split train
"""

import argparse

import config
from utils.common import patches_path, print_setup, script_main
from utils.data import preparation_name
from utils.patches import montage_path, write_patches


@script_main
def main(argv=None):
    print_setup("extract_patches.py")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default="train", help="which split's patients (default train)")
    parser.add_argument("--seed", type=int, default=config.PATCH_SEED, help="seed of the centre draws")
    parser.add_argument("--n_per_patient", type=int, default=config.PATCHES_PER_PATIENT,
                        help="patches per patient (default config.PATCHES_PER_PATIENT)")
    parser.add_argument("--n_vessel", type=int, default=config.VESSEL_PATCHES_PER_PATIENT,
                        help="of these, centred on a vessel voxel (default config.VESSEL_PATCHES_PER_PATIENT)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = parser.parse_args(argv)

    patches = write_patches(args.split, args.seed, args.n_per_patient, args.n_vessel, args.overwrite)
    n_patients = len(set(patches["patient"]))
    print(f"{len(patches['img'])} patches ({n_patients} patients x {args.n_per_patient}, {args.n_vessel} "
          f"vessel-centred each) of {preparation_name(config.SKULL_STRIP)} volumes -> {patches_path(args.split)}\n"
          f"montage -> {montage_path(args.split)}")


if __name__ == "__main__":
    main()
