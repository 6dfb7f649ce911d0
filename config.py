"""Every setting of the pipeline, as plain Python values, in one place.

The values below are the paper's (Kossen et al. 2022). Edit them here to change an experiment.
A preset (a small Python file in presets/) overrides some of them; choose one with the environment
variable DPGAN_PRESET (for example `DPGAN_PRESET=demo`). Paths come from DPGAN_DATA_DIR and
DPGAN_WORK_DIR, relative to the current directory unless absolute.
"""

import math
import os
from pathlib import Path

PRESET = os.environ.get("DPGAN_PRESET", "").strip() or "paper"
DATA_DIR = Path(os.environ.get("DPGAN_DATA_DIR", "data"))
WORK_DIR = Path(os.environ.get("DPGAN_WORK_DIR", "work"))

# ---- Data (docs/real-data.md): DATA_DIR/<split>/<patient>_{img,label,mask}.nii.gz ----
SPLITS = ("train", "val", "test", "test2")
N_PATIENTS = {"train": 41, "val": 11, "test": 14, "test2": 65}
# None: each split's patients are found from its folder's files (sorted ids); a dict {split: [ids]} lists them for the
# splits it names (docs/real-data.md). The phantoms' ids are "<split>_<index>" (utils/phantoms.py phantom_ids).
PATIENT_IDS = None
VOLUME_SHAPE = (312, 384, 127)  # voxels of the phantoms, x y z (z axial)
VOXEL_SPACING = (0.5, 0.5, 0.7)  # mm
PHANTOM_SEED = 2022
EXTERNAL_SPLITS = ("test2",)  # imaged with the phantoms' other protocol (the external 1000Plus set)
# Skull stripping, as the authors prepared their scans: image and label x brain mask wherever a volume is read
# (patches, prediction, evaluation). False: the raw scan, skull and scalp included (docs/method.md, "Data and skull
# stripping").
SKULL_STRIP = True

# ---- Patch extraction (step 1) ----
PATCH_SIZE = 96
PATCHES_PER_PATIENT = 1000
VESSEL_PATCHES_PER_PATIENT = 500  # centred on a vessel voxel; the rest on a brain-mask voxel
PATCH_SEED = 42

# ---- DP-WGAN (step 2), the defaults of run_gan.py's flags ----
LATENT_DIM = 128
NGF = 96
NDF = 96
KG = 4
KD = 4
STRG = 2
STRD = 2
PADG = 1
OPG = 0
UPSAMPLING = False
# The recipe: the paper's (below) or, e.g., presets/dcgan.py. ARCH "paper": the paper's networks (model.py Generator,
# Discriminator); "dcgan": the small DCGAN pair (model.py DCGANGenerator, DCGANCritic).
ARCH = "paper"
LOSS = "wgan"  # "wgan" (with weight clipping, the paper), "hinge", "ns" (non-saturating)
OPTIMIZER = "rmsprop"  # "rmsprop" (the paper) or "adam" (betas BETA1, 0.999)
BETA1 = 0.5
EMA = 0.0  # decay of an exponential moving average of the generator's weights (0: off); synthesis samples it
DIFFAUGMENT = False  # DiffAugment (flips, translation) of real and generated pairs before the critic
LABEL_SCALE = "01"  # real labels as 0/1 (the paper) or "pm1": -1/1, the range of the generator's output
# A public warm start (--init_from): a run_gan.py checkpoint of a run on data that is NOT the patients' (a public
# dataset). Its generator and critic are where training starts; epsilon covers this run's training data only.
INIT_FROM = None
# demo.py (`make demo`, `make utility`): the expected batch of the two GANs that train on the patients from the public
# GAN, the private one and its non-private reference (None: BATCH_SIZE, as the public GAN). A larger batch at the same
# epsilon takes fewer, less noisy steps (presets/demo.py).
FINETUNE_BATCH_SIZE = None
# The critic's learning rate of a non-private reference that trains on the patients beside private GANs (demo.py's
# reference, sweep.py's noise-inf jobs; None: LRD, the private GANs' own). Adam divides each step by the scale of
# the gradients it sees, so a DP critic whose noise is r times its signal moves along its gradient about r times
# slower than LRD; a reference critic at LRD keeps the same start and updates but learns several times faster than
# the private critic it is compared with (presets/demo.py).
REFERENCE_LRD = None
BATCH_SIZE = 32
N_DISCR = 5
# Bie et al.'s adaptive n_D (utils/critic_schedule.py): None, n_D fixed at N_DISCR (the paper); a threshold (their 0.6
# at epsilon 10): n_D climbs 1, 2, 5, 10, 20, ... from N_DISCR when the critic's smoothed accuracy on generated
# samples falls to it, at least ADAPTIVE_GRACE generator steps after the last change (theirs: 200).
ADAPTIVE_CRITIC = None
ADAPTIVE_GRACE = 200
EPOCHS = 50
LRD = 5e-5
LRG = 5e-5
MAX_NORM_DP = 1.0
CLIP_PARAM_W = 0.01
NOISE_MULTIPLIER = 1.0
NOISE_MULTIPLIERS = (math.inf, 2, 1.5, 1.2, 1, 0.8, 0.725, 0.65)  # the paper's grid
GAN_SEEDS = (12, 13, 14, 15, 16)  # 5 GANs per noise multiplier
GAN_SEED = 12
# "strict": valid accounting; "paper": the authors' loop (docs/method.md, "Strict and paper accounting")
DP_MODE = "strict"
DELTA = None  # None: 1 / number of training patches
DP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # RDP orders (Opacus/paper)
# Per-sample clipping engine: "bk" (utils/bookkeeping.py; the fastest on the 2-core CPU: docs/performance.md, "The
# benchmarks") or Opacus's "hooks", "functorch", "ew", "ghost". All give the same clipped, noised update (tested).
GRAD_SAMPLE_MODE = "bk"
# bk engine: at most this many samples per forward/backward pass of a private critic step, so that a large
# logical batch fits a GPU (the update is the same); None: the whole batch at once.
MAX_PHYSICAL_BATCH = None
# Mixed precision (bfloat16 autocast) for the networks' passes, e.g. on a GPU; the private step's norms, clipping
# and noise stay float32 (docs/performance.md, "For a GPU"). False: float32 throughout.
AMP = False
PRIVACY_UNIT = "patch"  # "patch": the paper's; "patient": patient-level DP (Poisson-sampled patients)
BATCH_PATIENTS = 4  # --privacy_unit patient: expected patients per critic iteration
PATCHES_PER_PATIENT_STEP = 8  # --privacy_unit patient: patches each sampled patient contributes per iteration

# ---- Synthesis (step 3) ----
THRESH = 0.8
NR_E_SKIPPED = 5  # --epoch 9999: the epoch of minimum generator loss after skipping these
GENERATION_BATCH = 500
SYNTHESIS_SEED = 1  # generate_samples.py --seed: the latent draws

# ---- U-Net (step 4), Livne et al. 2019 half U-Net ----
UNET_KERNELS = (32, 64, 128, 256, 512)
UNET_EPOCHS = 15
UNET_BATCH_SIZE = 64
UNET_LEARNING_RATES = (1e-4, 8e-5)
UNET_DROPOUTS = (0.0, 0.1)
UNET_AUGMENTATION = (True, False)
AUG_ROTATION_DEG = 30
AUG_SHEAR_DEG = 20
AUG_VERTICAL_FLIP = True
UNET_SEED = 7
# Output bias starts at logit(vessel fraction of the training labels), not 0 (the authors' Keras): from p = 0.5 the
# soft Dice's first Adam steps can throw the U-Net into its all-zero output (utils/unet.py). False: Keras's zero.
UNET_START_AT_PRIOR = True
# A U-Net that ends an epoch collapsed (below) is trained again from scratch with another seed, at most this many
# times: whether one falls into the all-zero output depends on its seed (utils/unet.py). 0: keep it, flagged.
UNET_COLLAPSE_RETRIES = 2

# ---- Evaluation (step 5) ----
PREDICTION_THRESHOLD = 0.5
# A U-Net "collapsed" (the soft Dice's all-zero output) if it predicts fewer vessel voxels than this fraction of
# the true ones: on its check patches after every epoch (history.csv) and on the val patients (never selected).
COLLAPSE_FRACTION = 0.01
# Tiles per forward pass when predicting. 16 keeps a CPU's caches warm (measured fastest on 2 cores: 24 ms per
# tile against 45 at 64); a GPU wants more.
PREDICTION_BATCH_CPU = 16
PREDICTION_BATCH_GPU = 128
N_SSIM_IMAGES = 1000
N_TSNE_IMAGES = 500  # per group
TSNE_PERPLEXITY = 30
FID_BATCH = 50
FID_N_IMAGES = None  # images per set for FID (seeded random subset); None: all, as the paper
# None: pytorch-fid's usual file in torch's hub cache (docs/method.md, "Image quality: FID, SSIM, t-SNE")
FID_WEIGHTS = None
EVAL_SEED = 3

# ---- The grid on a cluster (sweep.py; submitit) ----
SWEEP_PARTITION = None  # None: the cluster's default partition
SWEEP_GPUS_PER_JOB = 1
SWEEP_CPUS_PER_JOB = 8
SWEEP_MEM_GB = 32
SWEEP_TIME_MIN = 24 * 60  # a job past this is requeued and resumes from its last checkpoint

# ---- Privacy audit (step 6) ----
AUDIT_MAX_QUERIES = 2000  # members and as many non-members per audit (distances cost queries x synthetic pairs)


def _apply_preset(name):
    path = Path(__file__).resolve().parent / "presets" / f"{name}.py"
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.py"))
        raise SystemExit(f"DPGAN_PRESET={name!r}: no file {path} (available: {', '.join(available)})")
    values = {}
    exec(compile(path.read_text(), str(path), "exec"), {"math": math}, values)
    if "_BASE" in values:  # a preset may build on another: _BASE = "demo"
        _apply_preset(values["_BASE"])
    for key, value in values.items():
        if key.startswith("_") or not key.isupper():
            continue
        if key not in globals():
            raise SystemExit(f"preset {path}: {key} is not a setting of config.py (a typo?)")
        globals()[key] = value


if PRESET != "paper":
    _apply_preset(PRESET)
