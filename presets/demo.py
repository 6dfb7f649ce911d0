# `make demo`: every step at a small scale on a 2-core CPU in under 20 minutes (measured: see README).
N_PATIENTS = {"train": 6, "val": 2, "test": 2, "test2": 2}
VOLUME_SHAPE = (192, 224, 48)
PATCHES_PER_PATIENT = 200
VESSEL_PATCHES_PER_PATIENT = 100
NGF = 16
NDF = 16
BATCH_SIZE = 32
N_DISCR = 5
EPOCHS = 4
# The paper's 5e-5 needs tens of thousands of updates; the demo has about 150, so it learns 40x faster.
LRD = 2e-3
LRG = 2e-3
NR_E_SKIPPED = 1
UNET_KERNELS = (8, 16, 32, 64, 128)
# On held-out val patches 4 epochs reach a mean patch Dice of 0.67, 8 reach 0.72 (the target is 0.7).
UNET_EPOCHS = 8
UNET_BATCH_SIZE = 32
UNET_LEARNING_RATES = (1e-3,)
UNET_DROPOUTS = (0.0,)
UNET_AUGMENTATION = (False,)
N_SSIM_IMAGES = 200
N_TSNE_IMAGES = 200
FID_N_IMAGES = 500
