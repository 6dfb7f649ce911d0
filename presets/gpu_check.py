# benchmarks/gpu_check.py, part end_to_end: every script at the paper's patch size (96), volume shape
# (312 x 384 x 127) and networks (GAN, U-Net), on a few phantoms, within a few minutes on one GPU (docs/gpu-check.md).
# Phantoms: two training patients, one for each of val, test and test2 (each volume takes about 15 s on a CPU core).
N_PATIENTS = {"train": 2, "val": 1, "test": 1, "test2": 1}
# 3,000 training patches: 94 generator updates an epoch; gpu_check.py trains 3 epochs (282 updates, 3 checkpoints).
PATCHES_PER_PATIENT = 1500
VESSEL_PATCHES_PER_PATIENT = 750
# One U-Net of the paper's grid for one epoch (2 N / 64 = 93 steps) instead of eight for 15.
UNET_EPOCHS = 1
UNET_LEARNING_RATES = (1e-4,)
UNET_DROPOUTS = (0.0,)
UNET_AUGMENTATION = (True,)
# Image quality on fewer images (SSIM's pairs and t-SNE's fit run on the CPU); FID is computed where its weights are.
N_SSIM_IMAGES = 200
N_TSNE_IMAGES = 200
FID_N_IMAGES = 1000
