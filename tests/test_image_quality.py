"""Image quality: the real images FID and SSIM compare with, and the groups of the t-SNE figure."""

import numpy as np
import pytest

import config
from tests.test_evaluation import EPOCH, THRESH, TRAIN_INPUT, TRIAL, write_patches, write_synthetic, write_volume
from utils.common import synthetic_path
from utils.data import patient_ids
from utils.image_quality import ensure_test_patches, tsne_groups


@pytest.fixture
def sets(dirs):
    """Real training patches and two synthetic sets: a private one (TRIAL) and a non-private one."""
    rng = np.random.default_rng(5)
    write_patches("train", 30, rng)
    write_synthetic(TRIAL, 5.2, rng)
    write_synthetic("NP", "inf", rng)


def test_tsne_groups_real_evaluated_and_other_kind(sets):
    groups = tsne_groups(synthetic_path(TRIAL, EPOCH, THRESH), np.zeros((30, 96, 96), np.float32))
    real = "real (train; internal, do not share)"
    assert list(groups) == [real, f"private (valid eps 5.2) {TRAIN_INPUT} (evaluated)",
                            f"non-private (eps inf) DP_NP_{EPOCH}_{THRESH}"]
    assert all(len(images) == config.N_TSNE_IMAGES for images in groups.values())
    assert groups[real].min() == 0 and groups[real].max() == 255  # min-max scaled per patch


def test_missing_test_patches_are_extracted(dirs):
    rng = np.random.default_rng(5)
    write_volume(dirs[0] / "test", "test_000", rng)
    path = ensure_test_patches()
    patches = np.load(path)
    assert len(patches["img"]) == config.PATCHES_PER_PATIENT * len(patient_ids("test"))
    assert set(patches.files) >= {"img", "label", "patient", "centre"}
