"""Write synthetic TOF-MRA phantoms in the authors' layout: DATA_DIR/<split>/<patient>_{img,label,mask}.nii.gz, with
config.N_PATIENTS[split] patients <split>_000, <split>_001, ... per split (the pipeline finds them from the files).

Patients whose files exist already (made with the same seed, shape and spacing) are skipped, so re-running
reuses the data; any other existing file is an error unless --overwrite. Also writes DATA_DIR/<split>_preview.png.
"""

import argparse

import config
from utils.common import print_setup, script_main
from utils.phantoms import write_phantoms


@script_main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--splits", nargs="+", choices=config.SPLITS, default=list(config.SPLITS),
                        help="splits to write (default: all)")
    parser.add_argument("--seed", type=int, default=config.PHANTOM_SEED,
                        help="base seed; each patient's phantom is seeded by it, the split and the patient's index")
    parser.add_argument("--overwrite", action="store_true", help="replace existing phantom files")
    args = parser.parse_args(argv)
    print_setup("make_phantoms")
    written = write_phantoms(config.DATA_DIR, args.splits, args.seed, overwrite=args.overwrite)
    print(f"{len(written)} phantom(s) written to {config.DATA_DIR} "
          f"(shape {tuple(config.VOLUME_SHAPE)}, spacing {tuple(config.VOXEL_SPACING)} mm)")


if __name__ == "__main__":
    main()
