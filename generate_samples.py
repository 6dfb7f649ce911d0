"""Step 3: synthesise image-label pairs from a trained DP-WGAN generator.

    python generate_samples.py --trial GAN1 --epoch 49 --thresh 0.8
    python generate_samples.py --trial GAN2 --epoch 49 --chosen_from GAN1 GAN2 GAN3   # GAN2 was the best of three

writes work/synthetic/gen_patches_DP_<trial>_<epoch>_<thresh>.npz (`img` float32 N x 96 x 96 x 1 in [0, 255],
`label` uint8 N x 96 x 96 x 1), a .json with the epoch, epsilon and settings, and a .png of 16 pairs.
"""

import argparse

import config
from utils.common import add_device_arg, print_setup, script_main
from utils.synthesis import BEST_EPOCH, generate_samples


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trial", required=True, help="GAN trial name (run_gan.py --trial)")
    p.add_argument("--epoch", type=int, required=True,
                   help=f"zero-based epoch of the generator checkpoint; {BEST_EPOCH} = the epoch of minimum "
                        f"generator loss (log.csv loss_g) after skipping the first --nr_e_skipped epochs")
    p.add_argument("--thresh", type=float, default=config.THRESH,
                   help="label = 1 where the generator's raw label output (tanh) is above this value, in [0, 1): "
                        "the generator imitates real labels of 0 and 1, so this is on the 0/1 label scale "
                        "(default %(default)s)")
    p.add_argument("--nr_e_skipped", type=int, default=None,
                   help=f"epochs skipped by --epoch {BEST_EPOCH} (default config.NR_E_SKIPPED = "
                        f"{config.NR_E_SKIPPED})")
    p.add_argument("--n_samples", type=int, default=None,
                   help="pairs to draw (default: the number of training patches, from the patches file or else "
                        "the trial's config.json)")
    p.add_argument("--seed", type=int, default=config.SYNTHESIS_SEED, help="seed of the latent draws")
    p.add_argument("--chosen_from", nargs="+", default=None, metavar="TRIAL",
                   help="this trial was picked among these trials (on the same patients) by looking at their results "
                        "(e.g. the best val DSC of 5 seeds): the set and its release carry the epsilon of all of them "
                        "composed (the others at their last checkpoint), the run's own beside it")
    p.add_argument("--lrg", type=float, default=None,
                   help="accepted for compatibility with the authors' command line and ignored (generation does "
                        "not train)")
    shape = p.add_argument_group("generator shape", "default: the checkpoint's model_args; a value that "
                                 "contradicts the checkpoint is an error")
    for name in ("ngf", "kg", "strg", "padg", "opg"):
        shape.add_argument(f"--{name}", type=int, default=None)
    shape.add_argument("--upsampling", action=argparse.BooleanOptionalAction, default=None,
                       help="the upsampling generator variant")
    add_device_arg(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing synthetic set")
    return p.parse_args(argv)


@script_main
def main(argv=None):
    print_setup("generate_samples")
    return generate_samples(parse_args(argv))


if __name__ == "__main__":
    main()
