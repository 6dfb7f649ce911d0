# For tests: seconds, not minutes. Small volumes, few patients, small networks.
N_PATIENTS = {"train": 2, "val": 1, "test": 1, "test2": 1}
VOLUME_SHAPE = (128, 128, 16)
PATCHES_PER_PATIENT = 40
VESSEL_PATCHES_PER_PATIENT = 20
NGF = 8
NDF = 8
BATCH_SIZE = 8
N_DISCR = 2
EPOCHS = 2
UNET_KERNELS = (4, 8, 16, 32, 64)
UNET_EPOCHS = 1
UNET_BATCH_SIZE = 8
UNET_LEARNING_RATES = (1e-3,)
UNET_DROPOUTS = (0.0,)
UNET_AUGMENTATION = (True, False)
# Two steps leave a tiny U-Net below the collapse check (it predicts no vessel yet): retraining it would only triple
# the tests' U-Net time. tests/test_unet.py turns the retries on where it tests them.
UNET_COLLAPSE_RETRIES = 0
NR_E_SKIPPED = 0
GENERATION_BATCH = 16
N_SSIM_IMAGES = 20
N_TSNE_IMAGES = 20
TSNE_PERPLEXITY = 5
