"""utils.metrics against brute-force definitions and the reference implementations (skimage, scipy, pytorch-fid)."""

import math

import numpy as np
import pytest
import torch
import torchvision
from pytorch_fid import inception as fid_inception
from pytorch_fid.fid_score import calculate_frechet_distance
from scipy import ndimage
from scipy.spatial.distance import cdist
from scipy.stats import wasserstein_distance
from skimage.metrics import structural_similarity

import config
from utils import metrics
from utils.common import PipelineError

SPACING = (0.5, 0.5, 0.7)


def brute_force_bahd(pred, truth, spacing):
    """The SPEC's definition with all pairwise distances between voxel centres in mm."""
    p = np.argwhere(pred) * np.asarray(spacing)
    t = np.argwhere(truth) * np.asarray(spacing)
    distances = cdist(t, p)  # |G| x |P|
    return (distances.min(axis=1).sum() + distances.min(axis=0).sum()) / (2 * len(t))


def random_masks(rng, shape, fraction):
    truth = ndimage.binary_dilation(rng.random(shape) < fraction / 4)  # blobby structures
    flips = rng.random(shape) < 0.15
    pred = (truth & ~flips) | (ndimage.binary_dilation(truth) & flips)
    return pred, truth


# ---------------------------------------------------------------- DSC ----
def test_dice_against_counts():
    rng = np.random.default_rng(0)
    for _ in range(5):
        pred, truth = random_masks(rng, (14, 12, 9), 0.2)
        tp, fp, fn = (pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth).sum()
        assert metrics.dice(pred.astype(np.uint8), truth) == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-15)
    assert metrics.dice(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0])) == pytest.approx(0.5)


def test_dice_empty_and_bad_input():
    empty = np.zeros((4, 5, 6), np.uint8)
    some = empty.copy()
    some[1, 2, 3] = 1
    assert metrics.dice(empty, empty) == 1.0
    assert metrics.dice(some, empty) == metrics.dice(empty, some) == 0.0
    with pytest.raises(ValueError, match="binary"):
        metrics.dice(some * 0.7, some)
    with pytest.raises(ValueError, match="shape"):
        metrics.dice(some, some[:-1])


# ---------------------------------------------------------------- bAHD ----
def test_bahd_against_brute_force():
    rng = np.random.default_rng(1)
    for shape in ((12, 10, 8), (9, 15, 6)):
        pred, truth = random_masks(rng, shape, 0.15)
        pred[0, 0, 0] = True  # an isolated false positive far from most vessels
        expected = brute_force_bahd(pred, truth, SPACING)
        assert metrics.balanced_average_hausdorff(pred, truth, SPACING) == pytest.approx(expected, rel=1e-12)
    # a solid predicted block swallowing part of the truth: nearest voxels come from the block's surface
    truth = np.zeros((16, 14, 10), bool)
    truth[2:14, 6:8, 4:6] = True
    pred = np.zeros_like(truth)
    pred[5:13, 3:12, 1:9] = True
    expected = brute_force_bahd(pred, truth, SPACING)
    assert metrics.balanced_average_hausdorff(pred, truth, SPACING) == pytest.approx(expected, rel=1e-12)
    # other dimensions and disjoint masks
    pred2d, truth2d = random_masks(rng, (20, 17), 0.1)
    truth2d[:, :3] = False
    pred2d[:, 3:] = False
    pred2d[5, 1] = True
    assert metrics.balanced_average_hausdorff(pred2d, truth2d, (0.3, 0.9)) == pytest.approx(
        brute_force_bahd(pred2d, truth2d, (0.3, 0.9)), rel=1e-12)


def test_bahd_equals_distance_transform_form():
    """The same sums from scipy's exact Euclidean distance transform of the whole volume."""
    rng = np.random.default_rng(2)
    pred, truth = random_masks(rng, (40, 36, 20), 0.03)
    to_pred = ndimage.distance_transform_edt(~pred, sampling=SPACING)[truth].sum()
    to_truth = ndimage.distance_transform_edt(~truth, sampling=SPACING)[pred].sum()
    expected = (to_pred + to_truth) / (2 * truth.sum())
    assert metrics.balanced_average_hausdorff(pred, truth, SPACING) == pytest.approx(expected, rel=1e-12)


def test_bahd_by_hand():
    """A line of voxels along z, spacing 2 mm along it: truth at z = 0, 1; pred at z = 1, 4.
    truth -> pred: 2 + 0 mm; pred -> truth: 0 + 6 mm; (2 + 6) / (2 * 2) = 2 mm."""
    truth = np.zeros((1, 1, 6), bool)
    pred = np.zeros_like(truth)
    truth[0, 0, [0, 1]] = True
    pred[0, 0, [1, 4]] = True
    assert metrics.balanced_average_hausdorff(pred, truth, (1.0, 1.0, 2.0)) == pytest.approx(2.0)
    # not symmetric in its arguments: the normaliser is |truth| (|pred| = 3 here, |truth| = 2)
    pred[0, 0, 5] = True
    assert metrics.balanced_average_hausdorff(pred, truth, (1.0, 1.0, 2.0)) == pytest.approx((2 + 6 + 8) / 4)
    assert metrics.balanced_average_hausdorff(truth, pred, (1.0, 1.0, 2.0)) == pytest.approx((2 + 6 + 8) / 6)


def test_bahd_empty_cases_and_bad_spacing():
    empty = np.zeros((5, 5, 5), np.uint8)
    some = empty.copy()
    some[2, 2, 2] = 1
    assert metrics.balanced_average_hausdorff(empty, empty, SPACING) == 0.0
    assert metrics.balanced_average_hausdorff(some, empty, SPACING) == math.inf  # truth empty
    assert metrics.balanced_average_hausdorff(empty, some, SPACING) == math.inf  # pred empty
    assert metrics.balanced_average_hausdorff(some, some, SPACING) == 0.0
    for spacing in ((0.5, 0.5), (0.5, 0.0, 0.7), (0.5, np.nan, 0.7)):
        with pytest.raises(ValueError, match="spacing"):
            metrics.balanced_average_hausdorff(some, some, spacing)


# ---------------------------------------------------------------- SSIM ----
def skimage_mean_ssim(images, data_range):
    images = np.asarray(images, np.float64)
    n = len(images)
    return np.mean([structural_similarity(images[i], images[j], data_range=data_range)
                    for i in range(n) for j in range(i + 1, n)])


def structured_images(rng, n, shape):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    images = []
    for k in range(n):
        kind = k % 4
        if kind == 0:
            img = rng.uniform(0, 255, shape)
        elif kind == 1:
            img = 255 * ((xx // (k + 2) + yy // 3) % 2)  # checkerboard-like stripes
        elif kind == 2:
            img = ndimage.gaussian_filter(rng.uniform(0, 255, shape), 2)  # smooth blobs
        else:
            img = np.full(shape, rng.uniform(0, 255))  # constant
        images.append(img)
    return np.array(images)


def test_ssim_matches_skimage():
    rng = np.random.default_rng(3)
    images = structured_images(rng, 9, (24, 31))
    data_range = images.max() - images.min()
    assert metrics.mean_pairwise_ssim(images) == pytest.approx(skimage_mean_ssim(images, data_range), abs=1e-10)
    assert metrics.mean_pairwise_ssim(images, 100.0) == pytest.approx(skimage_mean_ssim(images, 100.0), abs=1e-10)
    # single pairs, as N x H x W x 1 float32 stacks (the synthetic sets' layout), incl. constant images
    for i, j in ((0, 1), (1, 2), (2, 3), (3, 7), (0, 0)):
        pair = images[[i, j]].astype(np.float32)[..., None]
        expected = structural_similarity(pair[0, ..., 0].astype(np.float64), pair[1, ..., 0].astype(np.float64),
                                         data_range=255.0)
        assert metrics.mean_pairwise_ssim(pair, 255.0) == pytest.approx(expected, abs=1e-10)


def test_ssim_chunks_and_threads_cover_every_pair(monkeypatch):
    """More pairs per row than one chunk, on 1 and 2 threads; the thread setting is restored."""
    rng = np.random.default_rng(4)
    images = rng.uniform(0, 255, (23, 12, 12))
    expected = skimage_mean_ssim(images, 255.0)
    monkeypatch.setattr(metrics, "SSIM_PAIR_CHUNK", 5)
    before = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            assert metrics.mean_pairwise_ssim(images, 255.0) == pytest.approx(expected, abs=1e-10)
            assert torch.get_num_threads() == threads
        finally:
            torch.set_num_threads(before)


def test_ssim_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        metrics.mean_pairwise_ssim(np.zeros((1, 10, 10)))
    with pytest.raises(ValueError, match="7 x 7"):
        metrics.mean_pairwise_ssim(np.zeros((3, 6, 10)))
    with pytest.raises(ValueError, match="data_range"):
        metrics.mean_pairwise_ssim(np.full((3, 10, 10), 4.0))


# ---------------------------------------------------------------- FID ----
def test_frechet_distance_matches_pytorch_fid():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(60, 16))
    b = rng.normal(size=(45, 16)) * 1.3 + 0.2
    expected = calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-12)
    assert metrics.frechet_distance(a, b) > 1
    assert metrics.frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="dimension"):
        metrics.frechet_distance(a, b[:, :8])
    with pytest.raises(ValueError, match="N >= 2"):
        metrics.frechet_distance(a[:1], b)


def test_fid_status_and_missing_weights(tmp_path, monkeypatch):
    missing = tmp_path / "hub" / "pt_inception-2015-12-05-6726825d.pth"
    ok, reason = metrics.fid_status(missing)
    assert not ok
    assert reason == (f"FID: not computed: the Inception weights file {missing.name} is not in {missing.parent} and "
                      f"cannot be downloaded here; download it from {fid_inception.FID_WEIGHTS_URL} and put it there")
    with pytest.raises(PipelineError, match="not computed"):
        metrics.inception_model("cpu", missing)
    assert not missing.exists()
    # default: config.FID_WEIGHTS, else the file in torch's hub cache
    monkeypatch.setattr(config, "FID_WEIGHTS", missing)
    assert f"is not in {missing.parent} " in metrics.fid_status()[1]
    monkeypatch.setattr(config, "FID_WEIGHTS", None)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    assert f"is not in {tmp_path / 'torch_hub' / 'checkpoints'} " in metrics.fid_status()[1]
    present = tmp_path / "torch_hub" / "checkpoints" / missing.name
    present.parent.mkdir(parents=True)
    present.write_bytes(b"")
    assert metrics.fid_status() == (True, f"FID: Inception weights {present}")
    foreign = tmp_path / "foreign.pth"
    torch.save({"weight": torch.zeros(1)}, foreign)
    with pytest.raises(PipelineError, match="do not fit"):
        metrics.inception_model("cpu", foreign)


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """A weights file for pytorch-fid's FID Inception-v3 architecture, randomly initialised: built by its own
    fid_inception_v3() with the loading of the real weights (not available here) switched off."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fid_inception, "load_state_dict_from_url", lambda url, **kwargs: {})
        patch.setattr(torchvision.models.inception.Inception3, "load_state_dict", lambda self, *a, **k: None)
        torch.manual_seed(0)
        network = fid_inception.fid_inception_v3()
    path = tmp_path_factory.mktemp("fid") / "random_inception.pth"
    torch.save(network.state_dict(), path)
    return path, network.state_dict()


def test_fid_path_on_random_inception(random_inception_weights):
    path, state = random_inception_weights
    model = metrics.inception_model("cpu", path)
    assert torch.equal(model.blocks[0][0].conv.weight, state["Conv2d_1a_3x3.conv.weight"])  # our file was loaded
    rng = np.random.default_rng(6)
    images = rng.uniform(0, 255, (4, 96, 96)).astype(np.float32)
    images[2:] = ndimage.gaussian_filter(images[2:], (0, 3, 3))
    feats = metrics.inception_features(images[..., None], model, "cpu", batch_size=3)  # batches of 3 and 1
    assert feats.shape == (4, 2048) and feats.dtype == np.float64 and np.isfinite(feats).all()
    # pytorch-fid's input convention: [0, 1] images, 3 equal channels; here all 4 in one batch
    with torch.no_grad():
        direct = model(torch.from_numpy(images / 255).float()[:, None].repeat(1, 3, 1, 1))[0].reshape(4, -1)
    assert np.allclose(feats, direct.double().numpy(), rtol=1e-4, atol=1e-6 * np.abs(feats).max())
    # FID on a slice of the features: the 2,048-dimensional matrix square root alone takes ~40 s on 2 cores
    sliced = feats[:, :32] / np.abs(feats[:, :32]).max()
    assert metrics.frechet_distance(sliced, sliced) == pytest.approx(0, abs=1e-6)
    assert metrics.frechet_distance(sliced[:2], sliced[2:]) > 1e-3
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        metrics.inception_features(images * 2, model, "cpu")


# ---------------------------------------------------------------- t-SNE ----
def test_wasserstein_matrix_against_scipy():
    rng = np.random.default_rng(7)
    images = np.concatenate([rng.uniform(0, 255, (3, 9, 11)), rng.exponential(40, (3, 9, 11))])
    matrix = metrics.wasserstein_distance_matrix(images[..., None])
    assert matrix.shape == (6, 6) and np.allclose(matrix, matrix.T) and np.all(np.diag(matrix) == 0)
    for i, j in ((0, 1), (0, 4), (2, 5), (3, 4)):
        assert matrix[i, j] == pytest.approx(wasserstein_distance(images[i].ravel(), images[j].ravel()), rel=1e-12)


def test_tsne_plot_writes_png(tmp_path):
    rng = np.random.default_rng(8)
    groups = {"real": rng.uniform(0, 255, (8, 16, 16)), "synthetic": rng.exponential(30, (7, 16, 16, 1)),
              "private": rng.uniform(100, 200, (6, 16, 16))}
    path = tmp_path / "plots" / "tsne.png"
    parts = metrics.tsne_plot(groups, path, perplexity=5, seed=1)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {k: v.shape for k, v in parts.items()} == {"real": (8, 2), "synthetic": (7, 2), "private": (6, 2)}
    assert metrics.tsne_embedding(np.concatenate([groups["real"], groups["private"]]), 5, 1).shape == (14, 2)
    with pytest.raises(ValueError, match="perplexity"):
        metrics.tsne_embedding(groups["real"], perplexity=8, seed=1)
    with pytest.raises(ValueError, match="image size"):
        metrics.tsne_plot({"a": groups["real"], "b": groups["real"][:, :8]}, tmp_path / "x.png", 5, 1)
