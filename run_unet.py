"""Step 4: train the grid of half U-Nets on a synthetic set or on the real training patches.

    python run_unet.py --trial GAN1 --epoch 49 --thresh 0.8     # on generate_samples.py's output
    python run_unet.py --real                                   # on the real training patches

One folder per U-Net under work/unets/<training input>/<lr..._do..._aug...>/ with model.pt, meta.json and
history.csv (its `collapsed` column marks an epoch after which the U-Net predicts (almost) no vessel: it is then
trained again with another seed, config.UNET_COLLAPSE_RETRIES times at most). A U-Net that exists already is
skipped (--overwrite retrains it). The grid, epochs and batch size are config.UNET_* values.
"""

import argparse

from utils.common import add_device_arg, add_training_input_args, print_setup, script_main
from utils.unet import run_unets


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_input_args(p, real_help="train on the real training patches instead")
    add_device_arg(p)
    p.add_argument("--overwrite", action="store_true", help="retrain U-Nets that exist already")
    return p.parse_args(argv)


@script_main
def main(argv=None):
    print_setup("run_unet")
    return run_unets(parse_args(argv))


if __name__ == "__main__":
    main()
