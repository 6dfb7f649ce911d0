"""Step 4: train the grid of half U-Nets on a synthetic set or on the real training patches.

    python run_unet.py --trial GAN1 --epoch 49 --thresh 0.8     # on generate_samples.py's output
    python run_unet.py --real                                   # on the real training patches

One folder per U-Net under work/unets/<training input>/<lr..._do..._aug...>/ with model.pt, meta.json and
history.csv. A U-Net that exists already is skipped (--overwrite retrains it). The grid, epochs and batch size
are config.UNET_* values.
"""

import argparse

import config
from utils.common import print_setup, script_main
from utils.unet import run_unets


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trial", default=None, help="GAN trial of the synthetic set")
    p.add_argument("--epoch", type=int, default=None,
                   help="epoch of the synthetic set, as given to generate_samples.py")
    p.add_argument("--thresh", type=float, default=config.THRESH, help="label threshold of the synthetic set")
    p.add_argument("--real", action="store_true", help="train on the real training patches instead")
    p.add_argument("--device", default="auto", help="auto (GPU if there is one), cpu, cuda, cuda:1, ...")
    p.add_argument("--overwrite", action="store_true", help="retrain U-Nets that exist already")
    return p.parse_args(argv)


@script_main
def main(argv=None):
    print_setup("run_unet")
    return run_unets(parse_args(argv))


if __name__ == "__main__":
    main()
