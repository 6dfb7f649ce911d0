# `make curve` (DPGAN_PRESET=curve): a privacy-utility curve at the demo's scale on a 2-core CPU in under 2 hours
# (docs/recipes.md, "A curve that fits a laptop"): sweep.py over noise inf and three private levels, two seeds each.
_BASE = "demo"
# Every job trains 4 epochs (1,500 generator updates, 1,500 accounted steps); the noise multipliers give a valid
# (strict, RDP) epsilon of about 10, 5 and 2 there (python -m utils.privacy --target_epsilon 10 --epochs 4
# --batch_size 32 --n_samples 12000 --n_discr 1: 0.433, 0.528, 0.695, rounded up).
EPOCHS = 4
NOISE_MULTIPLIERS = (float("inf"), 0.44, 0.53, 0.70)
GAN_SEEDS = (12, 13)
