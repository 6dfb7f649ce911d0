# `make demo`: every step at a small scale on a 2-core CPU in under 20 minutes (measured: README, "Current results").
N_PATIENTS = {"train": 6, "val": 2, "test": 2, "test2": 2}
VOLUME_SHAPE = (192, 224, 48)
# 64 x 64 patches (the paper's are 96): a GAN update costs about 0.4 of one at 96, so the GANs get 2-3 times more
# updates in the same minutes; 64 pixels still show the U-Net enough of the skull and scalp to tell them from
# vessels (48 did not: real-data test DSC 0.62 against 0.82 at 64; docs/2026-11-23-recipe-study-raw-scans.md).
PATCH_SIZE = 64
# DP needs data: 2,000 patches per patient (1,000 vessel-centred), N = 12,000 (the paper: 1,000 per patient).
PATCHES_PER_PATIENT = 2000
VESSEL_PATCHES_PER_PATIENT = 1000
# The GAN: the dcgan recipe (docs/recipes.md, "The dcgan recipe"). The paper's WGAN needs tens of thousands of
# updates; this one switched its labels on after 400-900 updates in the recipe study; the demo gives it 2,250
# (6 epochs of 375), about 6 minutes on one core while the private GAN trains on the other.
ARCH = "dcgan"
NGF = 8  # generator widths 96, 48, 24, 12, 8
NDF = 16  # critic: 178 k parameters
LATENT_DIM = 64
LOSS = "ns"
OPTIMIZER = "adam"
BETA1 = 0.5
LRD = 2e-4
LRG = 2e-4
EMA = 0.99
DIFFAUGMENT = True
LABEL_SCALE = "pm1"
BATCH_SIZE = 32
N_DISCR = 1
EPOCHS = 6  # of round(12,000 / 32) = 375 generator updates
THRESH = 0.5  # the middle of the label scale: raw label output > 0
NR_E_SKIPPED = 1
UNET_KERNELS = (8, 16, 32, 64, 128)
# 2 epochs of 2 N / batch = 750 steps: after one epoch whether a U-Net had learned that the bright scalp outside the
# brain is no vessel depended on its seed (test DSC 0.754-0.853); after two the low ones were gone
# (docs/2026-11-22-unet-training.md)
UNET_EPOCHS = 2
UNET_BATCH_SIZE = 32
# 1e-3, started at the prior (config.UNET_START_AT_PRIOR): from p = 0.5, lr 1e-3 threw the U-Net into the soft
# Dice's all-zero output on one CPU and 3e-4 threw it onto non-vessel pixels on synthetic pairs; from
# the prior neither happens, and 1e-3 reaches in 225 steps what 3e-4 did in 600 (studies/unet_seed_study.py;
# docs/2026-11-22-unet-training.md).
UNET_LEARNING_RATES = (1e-3,)
UNET_DROPOUTS = (0.0,)
# Augmentation (rotation, vertical flip, shear; the paper's grid has it): on skull-stripped phantoms it lifted the
# non-private set's test DSC from 0.41 to 0.53 and the private one's from 0.32 to 0.46; real patches 0.85 -> 0.82
# (docs/2026-12-03-recipe-study.md). One setting, not the grid's two: a second U-Net per set does not fit 20 minutes.
UNET_AUGMENTATION = (True,)
# The GANs that train on the patients from the public GAN (the private one and its non-private reference) take
# batches of 128: at the same epsilon 188 steps at noise 0.50 instead of 750 at 0.44, noise-to-signal 9.5 instead of
# 25, and the private set's test DSC 0.65 instead of 0.46 (docs/2026-12-03-recipe-study.md).
FINETUNE_BATCH_SIZE = 128
# The non-private reference's critic at a tenth of LRD: the private critic's noise is about 10 times its signal per step
# (noise-to-signal 9.5), so under Adam it moves along its gradient about 10 times slower than LRD; at LRD the
# reference's critic outpaces it. Test DSC of the reference over GAN seeds 12-14: at LRD 0.246 / 0.305 / 0.395, at
# LRD / 10 0.588 / 0.479 / 0.539 (LRD / 4: 0.477, LRD / 40: 0.576, seed 12). The private set stays above it (mean
# 0.614 against 0.535; docs/2026-12-03-recipe-study.md, "The reference's critic").
REFERENCE_LRD = 2e-5
N_SSIM_IMAGES = 200
N_TSNE_IMAGES = 200
FID_N_IMAGES = 500
