"""Step 1: draw 2-D axial patches (half vessel-centred, half brain-centred) from every patient of a split.

Writes WORK_DIR/patches/<split>_patches.npz (img, label, patient, centre, skull_stripped) and a montage PNG beside
it. With config.SKULL_STRIP (the default, as the authors did) image and label are multiplied by the brain mask first.
Example: python extract_patches.py --split train

--check: validate the whole data folder from the NIfTI headers (no voxel is read, nothing is written) and print a
table per split of patients, shapes, voxel spacings and problems; the exit status is 2 if there is any problem, each
listed. Run it on a new data folder before any training (docs/real-data.md).
"""

import argparse

import config
from utils.common import PipelineError, patches_path, print_setup, script_main
from utils.data import preparation_name, summary_table, survey_data
from utils.patches import check_fits, montage_path, write_patches


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
    parser.add_argument("--check", action="store_true",
                        help="only validate every split of the data folder from the headers and print a summary")
    args = parser.parse_args(argv)
    if args.check:
        return check_data_folder()

    patches = write_patches(args.split, args.seed, args.n_per_patient, args.n_vessel, args.overwrite)
    n_patients = len(set(patches["patient"]))
    print(f"{len(patches['img'])} patches ({n_patients} patients x {args.n_per_patient}, {args.n_vessel} "
          f"vessel-centred each) of {preparation_name(config.SKULL_STRIP)} volumes -> {patches_path(args.split)}\n"
          f"montage -> {montage_path(args.split)}")


def check_data_folder():
    """Every split's patients as the pipeline will find them, their files checked from the headers; a PipelineError
    listing every problem (exit status 2) after the table."""
    surveys = survey_data(header_checks=[lambda header: check_fits(header.shape, header.patient)])
    print(f"data folder {config.DATA_DIR}, from the NIfTI headers:\n{summary_table(surveys)}")
    problems = [f"{survey.split}: {problem}" for survey in surveys for problem in survey.problems]
    if problems:
        raise PipelineError(f"{len(problems)} problem(s) in {config.DATA_DIR}; fix them before any step reads it:"
                            + "".join(f"\n  {problem}" for problem in problems))
    n_patients = sum(len(survey.patients) for survey in surveys)
    print(f"{n_patients} patients in {len(surveys)} splits: files complete, headers consistent (the voxels, binary "
          f"label and mask, are checked as each volume is read)")
    return surveys


if __name__ == "__main__":
    main()
