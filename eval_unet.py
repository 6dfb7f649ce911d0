"""Step 5: evaluate the U-Nets of one training input (paper section 3.4; docs/method.md, "Evaluation").

    python eval_unet.py --trial GAN1 --epoch 49 --thresh 0.8    # U-Nets trained on a synthetic set
    python eval_unet.py --real                                  # U-Nets trained on the real patches

Every U-Net of the grid segments the `val` volumes; the one with the best mean DSC segments `test` and `test2`
(DSC, bAHD in mm). A U-Net that collapsed (predicts (almost) no vessel on val) is named and never selected while
another is not; if every one did, the result file says so in a WARNING line. For a synthetic set also FID to
the real train and test patches, SSIM and a t-SNE.
Writes probability maps under work/predictions/, per-patient CSVs under work/results/<training input>/, and
work/results/<training input>_results.txt (+ .json, an error map PNG), then prints the result file.
Existing predictions are reused; --overwrite predicts again and replaces the result file.
"""

import argparse

from utils.common import add_device_arg, add_training_input_args, print_setup, script_main
from utils.evaluation import evaluate_training_input


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_input_args(p, real_help="evaluate the U-Nets trained on the real patches")
    add_device_arg(p)
    p.add_argument("--fid_weights", default=None,
                   help="pytorch-fid Inception weights file (default config.FID_WEIGHTS: pytorch-fid's usual file)")
    p.add_argument("--overwrite", action="store_true",
                   help="predict again (ignore cached probability maps) and replace the result file")
    return p.parse_args(argv)


@script_main
def main(argv=None):
    print_setup("eval_unet")
    text, path = evaluate_training_input(parse_args(argv))
    print(f"\n{path}:\n{text}", end="")
    return path


if __name__ == "__main__":
    main()
