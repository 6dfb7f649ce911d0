# `make utility`: the demo's steps (demo.py: the private GAN starts from a GAN of public phantoms) with the recipe
# that taught a U-Net most in the recipe study (README, row np_m + aug), on the demo's phantoms; 48 minutes on a
# 2-core CPU (measured: README "The utility run").
_BASE = "demo"
# A generator twice as wide, trained 16 epochs (6,000 updates): after about 4,000 it draws the bright scalp arc
# with an empty label, which is what teaches its U-Net that the scalp is no vessel (np_l and np_m in the README).
NGF = 16
EPOCHS = 16
# U-Net augmentation (rotation, vertical flip, shear): the few arc orientations the generator draws then reach
# the U-Net in more; with the demo's 750-step U-Nets it lifted np_m's set from test DSC 0.13 to 0.19-0.43.
UNET_AUGMENTATION = (True,)
