"""The phantoms' vessel tree (utils/vessel_tree.py): its rasterisation with partial volume."""

import numpy as np

import config
from utils import vessel_tree


def test_tube_occupancy_is_partial_volume():
    sigma = vessel_tree.psf_sigma(config.VOXEL_SPACING)
    wide = vessel_tree.tube_occupancy(np.array([-3.0, 0.0, 3.0]), np.array([20.0, 20.0, 20.0]))
    np.testing.assert_allclose(wide, [1, 0.5, 0], atol=0.05)
    # a tube thinner than a voxel fills only part of the voxel on its axis (area / blur spot)
    on_axis = vessel_tree.tube_occupancy(np.array([-0.1 / sigma]), np.array([0.1 / sigma]))[0]
    assert 0.1 < on_axis < 0.3
