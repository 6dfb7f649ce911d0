"""Image quality of a synthetic training set (docs/method.md, "Image quality: FID, SSIM, t-SNE"; paper section
3.4): FID of its images to the real train and test patches, mean pairwise SSIM of its images and of real ones,
and the t-SNE figure of real and synthetic images.

Choices, where the method leaves room: real patches are min-max scaled per patch to [0, 255], the synthetic
images' scale, before FID and SSIM. FID uses config.FID_N_IMAGES images per set (None: all), SSIM
config.N_SSIM_IMAGES generated and as many real training images, t-SNE config.N_TSNE_IMAGES per group; every
subset is a seeded random choice (config.EVAL_SEED). The t-SNE shows the real training patches, the evaluated
synthetic set and, if present, one other synthetic set of each kind (non-private: epsilon inf; private: finite
epsilon) that the evaluated set is not, the first by file name, like the paper's real / non-private / private
figure.
"""

import math
from pathlib import Path

import numpy as np

import config
from utils import metrics
from utils.common import load_json, load_npz, minmax_scale, patches_path
from utils.patches import ensure_patches

SCALE_CHUNK = 2048  # patches per chunk when min-max scaling real patches (bounds the temporary memory)
# purposes of the seeded random subsets, so that each draw is independent of the others' sizes
FID_DRAW, SSIM_DRAW, TSNE_DRAW = 0, 1, 2


def tsne_path(train_input):
    return config.WORK_DIR / "results" / f"{train_input}_tsne.png"


def choose(n_total, n, draw):
    """Sorted indices of a seeded random subset of n (None or >= n_total: all) of n_total items."""
    if n is None or n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng([config.EVAL_SEED, draw]).choice(n_total, size=n, replace=False))


def real_images(split, n=None, draw=FID_DRAW):
    """Real patches of a split (a seeded subset of n, or all), min-max scaled per patch to [0, 255]."""
    raw = load_npz(patches_path(split), ("img",), f"{split} patches")["img"]
    index = choose(len(raw), n, draw)
    out = np.empty((len(index), *raw.shape[1:]), np.float32)
    for start in range(0, len(index), SCALE_CHUNK):
        out[start:start + SCALE_CHUNK] = minmax_scale(raw[index[start:start + SCALE_CHUNK]], 0, 255)
    return out


def ensure_test_patches():
    """The test patches FID compares with; extracted like `extract_patches.py --split test` if missing."""
    return ensure_patches("test")


def synthetic_images(path):
    """The image array (N x 96 x 96, [0, 255]) of a synthetic set."""
    img = load_npz(path, ("img",), "synthetic set")["img"]
    return img[..., 0] if img.ndim == 4 else img


def fid_scores(generated, device, weights_path):
    """FID of the generated images to the real train and test patches, or why it was not computed."""
    ok, reason = metrics.fid_status(weights_path)
    if not ok:  # the reason may already start with "FID: not computed: "; say it once
        return {"fid": f"not computed: {reason.removeprefix('FID: ').removeprefix('not computed: ')}"}
    model = metrics.inception_model(device, weights_path)

    def features(images):
        return metrics.inception_features(images, model, device, config.FID_BATCH)

    gen_features = features(generated[choose(len(generated), config.FID_N_IMAGES, FID_DRAW)])
    ensure_test_patches()
    fid_train = float(metrics.frechet_distance(gen_features, features(real_images("train", config.FID_N_IMAGES))))
    fid_test = float(metrics.frechet_distance(gen_features, features(real_images("test", config.FID_N_IMAGES))))
    return {"fid_train": fid_train, "fid_test": fid_test, "fid_difference": fid_train - fid_test}


def image_quality(generated, device, weights_path):
    """FID (train, test, train - test) and mean pairwise SSIM of generated and real training images.
    generated None (training on real data): the generated-image metrics are not applicable."""
    n_ssim = config.N_SSIM_IMAGES
    ssim_real = float(metrics.mean_pairwise_ssim(real_images("train", n_ssim, SSIM_DRAW)))
    if generated is None:
        na = "not applicable (real training data)"
        return {"fid": na, "ssim_generated": na, "ssim_real": ssim_real}
    ssim_gen = float(metrics.mean_pairwise_ssim(generated[choose(len(generated), n_ssim, SSIM_DRAW)]))
    return {**fid_scores(generated, device, weights_path), "ssim_generated": ssim_gen, "ssim_real": ssim_real}


def read_set_info(npz_path):
    """The JSON written beside a synthetic set (its epsilon etc.); a clear error if missing or unreadable."""
    return load_json(Path(npz_path).with_suffix(".json"), f"the information file of synthetic set {npz_path}",
                     " (written by generate_samples.py)")


def epsilon_of(info):
    """The valid epsilon of a synthetic set's info as a float (inf for a non-private GAN), None if it has none."""
    try:
        return float(info.get("epsilon_valid"))
    except (TypeError, ValueError):
        return None


def tsne_groups(evaluated_path, generated):
    """{group name: images}: real training patches, the evaluated set and one other set of each missing kind."""
    n = config.N_TSNE_IMAGES
    epsilon = epsilon_of(read_set_info(evaluated_path))
    kinds_shown = set() if epsilon is None else {math.isinf(epsilon)}
    groups = {"real (train; internal, do not share)": real_images("train", n, TSNE_DRAW),
              f"{_kind(epsilon)} {evaluated_path.stem.removeprefix('gen_patches_')} (evaluated)":
                  generated[choose(len(generated), n, TSNE_DRAW)]}
    for path in sorted((config.WORK_DIR / "synthetic").glob("gen_patches_*.npz")):
        if path == evaluated_path or not path.with_suffix(".json").is_file():
            continue
        other = epsilon_of(read_set_info(path))
        if other is None or math.isinf(other) in kinds_shown:
            continue
        kinds_shown.add(math.isinf(other))
        images = synthetic_images(path)
        groups[f"{_kind(other)} {path.stem.removeprefix('gen_patches_')}"] = images[choose(len(images), n, TSNE_DRAW)]
    return groups


def _kind(epsilon):
    if epsilon is None:
        return "synthetic"
    return "non-private (eps inf)" if math.isinf(epsilon) else f"private (valid eps {epsilon:.3g})"

