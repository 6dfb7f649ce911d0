# `make curve` (DPGAN_PRESET=curve, demo.py --curve): a privacy-utility curve at the demo's scale on a 2-core CPU
# (docs/recipes.md, "A curve that fits a laptop"): the demo's data and public GAN, then sweep.py's jobs, each trained
# on the patients from the public GAN as the demo's two GANs are (2 epochs at batch 128: 188 updates).
_BASE = "demo"
# Valid (strict, RDP) epsilons of about 10, 5 and 2 after those 188 steps (python -m utils.privacy --target_epsilon
# 10 --epochs 2 --batch_size 128 --n_samples 12000 --n_discr 1: 0.464, 0.586, 0.802, rounded up); inf is the
# non-private reference, with the same start and updates and its critic at the demo's REFERENCE_LRD.
NOISE_MULTIPLIERS = (float("inf"), 0.47, 0.59, 0.81)
GAN_SEEDS = (12, 13)
