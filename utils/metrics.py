"""The evaluation metrics of docs/method.md, "Evaluation", each a plain function on arrays.

Segmentation: `dice`, `balanced_average_hausdorff`. Generated images: `mean_pairwise_ssim` (mode collapse),
FID with pytorch-fid's Inception-v3 (`fid_status`, `inception_model`, `inception_features`, `frechet_distance`)
and a t-SNE on Wasserstein distances (`wasserstein_distance_matrix`, `tsne_embedding`, `tsne_plot`).
Programming errors (wrong shapes, non-binary masks) raise ValueError; a missing or broken weights file, which
the user can fix, raises PipelineError.
"""

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.spatial.distance import pdist, squareform
from tqdm import tqdm

import config
from utils.common import PipelineError, save_figure

# skimage.metrics.structural_similarity's defaults for grey images, which mean_pairwise_ssim reproduces
SSIM_WIN = 7
SSIM_K1 = 0.01
SSIM_K2 = 0.03
SSIM_PAIR_CHUNK = 16  # image pairs per vectorised step: the buffers stay in the CPU caches
FID_DIMS = 2048  # Inception-v3 pool3 features


# ---------------------------------------------------------------- segmentation ----
def _binary_pair(pred, truth):
    """pred and truth as bool arrays of one shape; 0/1 or bool input only, so a probability map is not
    silently read as 'everything non-zero is a vessel'."""
    masks = []
    for name, mask in (("pred", pred), ("truth", truth)):
        mask = np.asarray(mask)
        if mask.dtype != bool:
            if ((mask != 0) & (mask != 1)).any():
                raise ValueError(f"{name} must be a binary mask (0/1 or bool); threshold probabilities first")
            mask = mask != 0
        masks.append(mask)
    if masks[0].shape != masks[1].shape:
        raise ValueError(f"pred and truth differ in shape: {masks[0].shape} vs {masks[1].shape}")
    return masks


def dice(pred, truth):
    """Dice similarity coefficient 2TP / (2TP + FP + FN) of two binary masks of one shape (any dimensions).

    Both masks empty: 1.0 (perfect agreement: nothing to find and nothing found).
    """
    pred, truth = _binary_pair(pred, truth)
    both = np.count_nonzero(pred) + np.count_nonzero(truth)  # = 2TP + FP + FN
    if both == 0:
        return 1.0
    return 2.0 * np.count_nonzero(pred & truth) / both


def balanced_average_hausdorff(pred, truth, spacing):
    """Balanced average Hausdorff distance (Aydin et al. 2021) in the unit of `spacing` (mm):
    (sum over truth voxels of the distance to the nearest pred voxel + sum over pred voxels of the distance
    to the nearest truth voxel) / (2 |truth|), with Euclidean distances between voxel centres scaled by the
    voxel spacing (anisotropic allowed). Exact: every voxel counts, no sampling of points.

    Empty masks: both empty -> 0.0. Truth empty and pred not -> inf (|G| = 0: undefined); pred empty and truth
    not -> inf (no predicted voxel to measure a distance to). The caller must report an inf, not average it.
    """
    pred, truth = _binary_pair(pred, truth)
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.shape != (pred.ndim,) or not np.all(np.isfinite(spacing) & (spacing > 0)):
        raise ValueError(f"spacing must be {pred.ndim} positive numbers (one per axis), got {spacing.tolist()}")
    n_truth, n_pred = np.count_nonzero(truth), np.count_nonzero(pred)
    if n_truth == 0 and n_pred == 0:
        return 0.0
    if n_truth == 0 or n_pred == 0:
        return math.inf
    box = _bounding_box(pred | truth)  # both sets lie inside, so every nearest voxel does too
    pred, truth = pred[box], truth[box]
    # Voxels in both masks are at distance 0; only the voxels of one mask outside the other add to the sums.
    total = _sum_of_nearest_distances(truth & ~pred, pred, spacing) + _sum_of_nearest_distances(pred & ~truth,
                                                                                                 truth, spacing)
    return float(total / (2 * n_truth))


def _bounding_box(mask):
    """Slices of the smallest box holding every True voxel of a non-empty mask."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def _sum_of_nearest_distances(queries, target, spacing):
    """Sum over the voxels of `queries` (all outside `target`) of the distance to the nearest `target` voxel.

    Exact nearest neighbours in a k-d tree, which is ~20x faster than a Euclidean distance transform of the
    whole box for vessel trees. The tree holds only the target's surface voxels (those with a 6-neighbour
    outside the target, inside the box): for a query q outside the target, the nearest target voxel t has the
    neighbour one step from t towards q (inside the box, as q and t are) strictly closer to q, so that
    neighbour is outside the target and t is a surface voxel.
    """
    points = np.argwhere(queries)
    if len(points) == 0:
        return 0.0
    surface = target & ~ndimage.binary_erosion(target, border_value=1)
    tree = cKDTree(np.argwhere(surface) * spacing)
    distances, _ = tree.query(points * spacing, workers=-1)
    return float(distances.sum())


# ---------------------------------------------------------------- images ----
def _image_stack(images, min_images=1):
    """images as an N x H x W array (an N x H x W x 1 stack loses its channel axis), dtype kept."""
    stack = np.asarray(images)
    if stack.ndim == 4 and stack.shape[-1] == 1:
        stack = stack[..., 0]
    if stack.ndim != 3:
        raise ValueError(f"images must be N x H x W (or N x H x W x 1), got shape {np.shape(images)}")
    if len(stack) < min_images:
        raise ValueError(f"need at least {min_images} images, got {len(stack)}")
    return stack


def mean_pairwise_ssim(images, data_range=None):
    """Mean SSIM over all unordered pairs of N grey images (N x H x W, N >= 2): for every pair it equals
    skimage.metrics.structural_similarity(a, b, data_range=data_range) with skimage's defaults (7 x 7 uniform
    window, K1 0.01, K2 0.03, sample covariance, border of 3 pixels cropped before the mean), computed in
    float64 (skimage computes float32 input in float32: ~1e-8 apart on 96 x 96 images in [0, 255]).

    data_range: None -> the global max - min of all images (skimage needs it for float images); must be > 0.

    Batched: the local means and variances of each image are computed once; per pair only the local cross
    moment, a 7 x 7 box sum of the product image by cumulative sums, is new. Pairs run in chunks on
    torch.get_num_threads() Python threads, with torch's own thread count set to 1 meanwhile (restored after).
    """
    import torch

    x = _image_stack(images, min_images=2).astype(np.float64)
    n, height, width = x.shape
    if min(height, width) < SSIM_WIN:
        raise ValueError(f"images must be at least {SSIM_WIN} x {SSIM_WIN} pixels for SSIM, got {height} x {width}")
    if data_range is None:
        data_range = float(x.max() - x.min())
    if not data_range > 0:
        raise ValueError(f"data_range must be positive, got {data_range} (all images are one constant?)")
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    n_win = SSIM_WIN**2
    cov_norm = n_win / (n_win - 1)  # sample covariance, as skimage's default
    # Scale images by sqrt(cross) so that window sums of products are `cross` * sum, folding a constant
    # into the data instead of spending a pass per pair on it.
    cross = 2 * cov_norm / n_win  # 2 * sigma_xy = cross * (sum_xy - sum_x * sum_y / n_win)
    padded = torch.zeros(n, height + 1, width + 1, dtype=torch.float64)  # zero first row/column: see _box_sums
    padded[:, 1:, 1:] = torch.from_numpy(x) * math.sqrt(cross)
    sums = _box_sums(padded)  # sqrt(cross) * window sums of x
    mean = sums / (math.sqrt(cross) * n_win)
    variance = cov_norm * (_box_sums(padded * padded) / (cross * n_win) - mean * mean)
    a1_scale = (2 / n_win) / cross  # A1 = 2 mean_x mean_y + C1 = a1_scale * (q + C1 / a1_scale), q below
    stats = {"padded": padded,
             "scaled_mean": (sums / SSIM_WIN).contiguous(),  # q = product of two = cross * n_win * mean_x * mean_y
             "half_b1": (mean * mean + c1 / 2).contiguous(),  # B1 = half_b1_x + half_b1_y
             "half_b2": (variance + c2 / 2).contiguous(),  # B2 = half_b2_x + half_b2_y
             "c2": c2,
             "a1_offset": c2 + c1 / a1_scale}
    workers = max(1, torch.get_num_threads())
    n_pairs = n * (n - 1) // 2
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)  # one pair chunk per thread: the chunks are too small for intra-op threads
    try:
        with tqdm(total=n_pairs, desc="SSIM pairs", unit="pair", unit_scale=True, leave=False) as bar, \
                ThreadPoolExecutor(workers) as pool:
            rows = [range(k, n - 1, workers) for k in range(workers)]  # interleaved: equal work per thread
            total = sum(pool.map(lambda r: _ssim_sum_over_rows(r, stats, bar), rows))
    finally:
        torch.set_num_threads(threads_before)
    return total * a1_scale / (n_pairs * (height - SSIM_WIN + 1) * (width - SSIM_WIN + 1))


def _box_sums(padded):
    """Sums over every SSIM_WIN x SSIM_WIN window lying inside the image (the windows whose SSIM skimage
    averages; outside them its reflecting border pad matters, inside it does not). `padded` holds each image
    behind a zero first row and column, so the cumulative sums start at 0: (..., H+1, W+1) -> (..., H-6, W-6)."""
    import torch

    rows = torch.cumsum(padded, dim=-2)
    rows = rows[..., SSIM_WIN:, :] - rows[..., :-SSIM_WIN, :]
    cols = torch.cumsum(rows, dim=-1)
    return cols[..., :, SSIM_WIN:] - cols[..., :, :-SSIM_WIN]


def _ssim_sum_over_rows(rows, stats, bar):
    """Sum of (SSIM map / a1_scale) over all pixels of the pairs (i, j > i) for i in rows, in place in
    preallocated buffers (13 passes over each pair's pixels)."""
    import torch

    padded, scaled_mean, half_b1, half_b2 = (stats[k] for k in ("padded", "scaled_mean", "half_b1", "half_b2"))
    n, hp, wp = padded.shape
    h, w = scaled_mean.shape[1:]
    chunk = SSIM_PAIR_CHUNK
    product, row_cumsum = (torch.empty(chunk, hp, wp, dtype=torch.float64) for _ in range(2))
    row_sums, col_cumsum = (torch.empty(chunk, h, wp, dtype=torch.float64) for _ in range(2))
    a2, a1, b1, b2 = (torch.empty(chunk, h, w, dtype=torch.float64) for _ in range(4))
    total = torch.zeros(chunk, h, w, dtype=torch.float64)
    c2 = torch.tensor(stats["c2"], dtype=torch.float64)
    a1_offset = torch.tensor(stats["a1_offset"], dtype=torch.float64)
    for i in rows:
        for start in range(i + 1, n, chunk):
            j = slice(start, min(n, start + chunk))
            m = j.stop - j.start
            torch.mul(padded[i], padded[j], out=product[:m])
            torch.cumsum(product[:m], dim=-2, out=row_cumsum[:m])
            torch.sub(row_cumsum[:m, SSIM_WIN:], row_cumsum[:m, :-SSIM_WIN], out=row_sums[:m])
            torch.cumsum(row_sums[:m], dim=-1, out=col_cumsum[:m])
            torch.sub(col_cumsum[:m, :, SSIM_WIN:], col_cumsum[:m, :, :-SSIM_WIN], out=a2[:m])  # cross * sum_xy
            torch.addcmul(c2, scaled_mean[i], scaled_mean[j], value=-1, out=a1[:m])  # C2 - cross*n_win*mx*my
            a2[:m] += a1[:m]  # A2 = 2 sigma_xy + C2
            torch.sub(a1_offset, a1[:m], out=a1[:m])  # A1 / a1_scale
            a1[:m] *= a2[:m]
            torch.add(half_b1[i], half_b1[j], out=b1[:m])
            torch.add(half_b2[i], half_b2[j], out=b2[:m])
            b1[:m] *= b2[:m]
            total[:m].addcdiv_(a1[:m], b1[:m])
        bar.update(n - 1 - i)
    return float(total.sum())


# ---------------------------------------------------------------- FID ----
def _fid_weights_path(weights_path=None):
    """The FID Inception weights file: weights_path, else config.FID_WEIGHTS, else pytorch-fid's usual file
    in torch's hub cache (where its own download would put it)."""
    import torch
    from pytorch_fid.inception import FID_WEIGHTS_URL

    chosen = weights_path or config.FID_WEIGHTS
    if chosen:
        return Path(chosen)
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_URL.rsplit("/", 1)[-1]


def fid_status(weights_path=None):
    """(ok, reason): whether the FID Inception weights file is there (see _fid_weights_path). Nothing is
    downloaded; reason says where to put the file otherwise."""
    from pytorch_fid.inception import FID_WEIGHTS_URL

    path = _fid_weights_path(weights_path)
    if path.is_file():
        return True, f"FID: Inception weights {path}"
    return False, (f"FID: not computed: the Inception weights file {path.name} is not in {path.parent} and cannot "
                   f"be downloaded here; download it from {FID_WEIGHTS_URL} and put it there")


def inception_model(device, weights_path=None, allow_download=False):
    """pytorch-fid's InceptionV3 returning the pool3 features (2,048), with the FID weights from the file of
    fid_status, in eval mode on `device`. A missing file raises PipelineError with fid_status's reason, unless
    allow_download (then it is fetched from pytorch-fid's URL to that path first)."""
    import torch
    from pytorch_fid import inception as fid_inception

    path = _fid_weights_path(weights_path)
    if not path.is_file():
        if not allow_download:
            raise PipelineError(fid_status(weights_path)[1])
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(fid_inception.FID_WEIGHTS_URL, str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a truncated or foreign file
        raise PipelineError(f"FID weights {path} cannot be read: {err}") from None
    # pytorch-fid's builder always fetches its weights by URL (downloading if they are not cached); hand it the
    # file checked above instead, so it never goes to the network.
    fetch = fid_inception.load_state_dict_from_url
    fid_inception.load_state_dict_from_url = lambda url, **kwargs: state
    try:
        model = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[FID_DIMS]])
    except RuntimeError as err:  # load_state_dict: missing or unexpected keys, wrong shapes
        raise PipelineError(f"FID weights {path} do not fit pytorch-fid's Inception-v3: {err}") from None
    finally:
        fid_inception.load_state_dict_from_url = fetch
    return model.to(device).eval()


def inception_features(images, model, device, batch_size=None):
    """Inception pool3 features (N x 2048, float64) of grey images (N x H x W, values in [0, 255]).

    As pytorch-fid feeds images: scaled to [0, 1] and repeated to 3 channels; the model itself resizes to
    299 x 299 and maps [0, 1] to [-1, 1]. batch_size None: config.FID_BATCH.
    """
    import torch

    stack = _image_stack(images)
    low, high = float(stack.min()), float(stack.max())
    if not (low >= -1e-3 and high <= 255 + 1e-3):  # float32 rounding allowed; also catches NaN
        raise ValueError(f"images must lie in [0, 255] (min-max scale them first), got [{low}, {high}]")
    batch_size = batch_size or config.FID_BATCH
    features = np.empty((len(stack), FID_DIMS), dtype=np.float64)
    with torch.no_grad():
        for start in tqdm(range(0, len(stack), batch_size), desc="Inception features", unit="batch", leave=False):
            batch = torch.as_tensor(stack[start:start + batch_size], dtype=torch.float32, device=device) / 255
            pooled = model(batch[:, None].expand(-1, 3, -1, -1))[0]  # B x 2048 x 1 x 1
            features[start:start + len(batch)] = pooled.reshape(len(batch), FID_DIMS).double().cpu().numpy()
    return features


def frechet_distance(feats_a, feats_b):
    """FID between two feature sets (N_a x D, N_b x D; at least 2 rows each): their means and covariances
    (as pytorch-fid computes them) given to pytorch_fid.fid_score.calculate_frechet_distance."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    statistics = []
    for name, feats in (("feats_a", feats_a), ("feats_b", feats_b)):
        feats = np.asarray(feats, dtype=np.float64)
        if feats.ndim != 2 or len(feats) < 2:
            raise ValueError(f"{name} must be N x D with N >= 2, got shape {feats.shape}")
        statistics.append((feats.mean(axis=0), np.cov(feats, rowvar=False)))
    (mu_a, sigma_a), (mu_b, sigma_b) = statistics
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature sets differ in dimension: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    return float(calculate_frechet_distance(mu_a, sigma_a, mu_b, sigma_b))


# ---------------------------------------------------------------- t-SNE ----
def wasserstein_distance_matrix(images):
    """N x N matrix of the 1-D Wasserstein distances between the intensity distributions of equal-size
    images (N x H x W): for two images of P pixels, the mean absolute difference of their sorted pixels."""
    stack = _image_stack(images)
    flat = stack.reshape(len(stack), -1)
    ordered = np.sort(flat.astype(np.float64), axis=1)
    return squareform(pdist(ordered, metric="cityblock") / ordered.shape[1])


def tsne_embedding(images, perplexity=None, seed=None):
    """N x 2 t-SNE embedding (sklearn, precomputed Wasserstein distances, random init) of N images.
    perplexity None: config.TSNE_PERPLEXITY (must be < N); seed None: config.EVAL_SEED."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits  # installed with scikit-learn, which uses it itself

    perplexity = config.TSNE_PERPLEXITY if perplexity is None else perplexity
    seed = config.EVAL_SEED if seed is None else seed
    n = len(_image_stack(images))
    if not 0 < perplexity < n:
        raise ValueError(f"t-SNE perplexity must be > 0 and < the number of images ({n}), got {perplexity}")
    distances = wasserstein_distance_matrix(images)
    tsne = TSNE(n_components=2, metric="precomputed", init="random", perplexity=perplexity, random_state=seed)
    # One OpenMP thread: the Barnes-Hut gradient runs ~1,000 short parallel regions, whose barriers stall on a
    # busy machine (1,500 images: 6 s on one thread, 36 s on two, on 2 shared cores).
    with threadpool_limits(1, user_api="openmp"):
        return tsne.fit_transform(distances)


def tsne_plot(groups, path, perplexity=None, seed=None):
    """Embed all groups ({name: N_g x H x W images}) together with tsne_embedding and save a scatter plot with
    a legend as a PNG at path. Returns {name: N_g x 2 embedding}."""
    import matplotlib.pyplot as plt

    stacks = {name: _image_stack(images) for name, images in groups.items()}
    if not stacks or any(len(s) == 0 for s in stacks.values()):
        raise ValueError(f"every t-SNE group needs images; got sizes {({k: len(s) for k, s in stacks.items()})}")
    sizes = {s.shape[1:] for s in stacks.values()}
    if len(sizes) > 1:
        raise ValueError(f"t-SNE groups differ in image size: {sorted(sizes)}")
    embedding = tsne_embedding(np.concatenate(list(stacks.values())), perplexity, seed)
    ends = np.cumsum([len(s) for s in stacks.values()])
    parts = dict(zip(stacks, np.split(embedding, ends[:-1])))
    fig, ax = plt.subplots(figsize=(7, 6))
    for name, points in parts.items():
        ax.scatter(points[:, 0], points[:, 1], s=6, alpha=0.6, label=f"{name} (n={len(points)})")
    ax.set_title("t-SNE of image intensity distributions (1-D Wasserstein distance)")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="best", fontsize=8, markerscale=2)
    save_figure(path, fig)
    return parts
