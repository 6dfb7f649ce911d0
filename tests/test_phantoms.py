"""Synthetic TOF-MRA phantoms (utils/phantoms.py, with the vessels of utils/vessel_tree.py) and make_phantoms.py, on
the tiny preset's volumes."""

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

import config
import make_phantoms
from utils import phantoms
from utils.data import patient_ids, patient_paths

SEED = [5, 6, 7]


def tiny_phantom(seed=SEED, external=False):
    return phantoms.make_phantom(config.VOLUME_SHAPE, config.VOXEL_SPACING, seed, external=external)


@pytest.fixture(scope="module")
def internal():
    return tiny_phantom()


@pytest.fixture(scope="module")
def external():
    return tiny_phantom(external=True)  # same tree as `internal`, imaged with the other protocol


def air_noise_sigma(img):
    """Gaussian SD behind the Rician noise, from a corner of the volume (air, Rayleigh distributed there)."""
    air = img[:6, :6, :].astype(float)
    return np.sqrt(np.mean(air**2) / 2)


def contrast_to_noise(phantom, where):
    """(image - median tissue) / noise SD at the voxels `where`; tissue = brain at least 2 voxels from the label."""
    label = phantom.label.astype(bool)
    tissue = phantom.mask.astype(bool) & ~ndimage.binary_dilation(label, iterations=2)
    return (phantom.img[where] - np.median(phantom.img[tissue])) / air_noise_sigma(phantom.img)


def thin_label(label):
    """Label voxels that an opening with the 6-neighbourhood removes: structures about one voxel across."""
    label = label.astype(bool)
    return label & ~ndimage.binary_opening(label, ndimage.generate_binary_structure(3, 1))


def test_same_seed_same_phantom_and_patients_differ(internal):
    again = tiny_phantom()
    for kind in ("img", "label", "mask", "affine"):
        np.testing.assert_array_equal(getattr(again, kind), getattr(internal, kind))
    other = tiny_phantom(seed=[5, 6, 8])
    assert np.mean(other.label != internal.label) > 0.005
    assert phantoms.patient_seed(1, "train", 0) != phantoms.patient_seed(1, "train", 1)
    assert phantoms.patient_seed(1, "train", 0) != phantoms.patient_seed(1, "val", 0)


def test_arrays_label_inside_mask_and_intensity_range(internal):
    img, label, mask, _ = internal
    assert img.shape == label.shape == mask.shape == tuple(config.VOLUME_SHAPE)
    assert (img.dtype, label.dtype, mask.dtype) == (np.float32, np.uint8, np.uint8)
    assert set(np.unique(label)) == {0, 1} and set(np.unique(mask)) == {0, 1}
    assert not np.any(label > mask)
    assert 0.3 < mask.mean() < 0.9
    assert img.min() >= 0 and 600 < img.max() < 2000  # TOF-like: roughly 0..~1000
    assert np.median(img[mask == 0]) < 0.5 * np.median(img[mask == 1])  # outside the head mostly dark


def test_affine_has_the_voxel_spacing(internal):
    spacing = np.linalg.norm(internal.affine[:3, :3], axis=0)
    np.testing.assert_allclose(spacing, config.VOXEL_SPACING)
    centre = internal.affine @ [*((np.asarray(config.VOLUME_SHAPE) - 1) / 2), 1]
    np.testing.assert_allclose(centre[:3], 0, atol=1e-9)


def test_vessel_fraction_plausible_and_enough_vessel_centres():
    half = config.PATCH_SIZE // 2
    for index in range(4):
        phantom = tiny_phantom(seed=[11, index])
        # a thin slab through the circle of Willis is vessel-dense; whole scans hold 0.5-3 % vessel voxels
        assert 0.005 < phantom.label.sum() / phantom.mask.sum() < 0.04
        # vessel voxels where a whole axial patch fits around them, for the vessel-centred patches
        fits = phantom.label[half:phantom.label.shape[0] - half + 1, half:phantom.label.shape[1] - half + 1]
        assert fits.sum() >= 3 * config.VESSEL_PATCHES_PER_PATIENT
        # vessels run through the slab, not only within it: most axial slices show some
        assert np.mean(phantom.label.any(axis=(0, 1))) > 0.8


def test_vessel_fraction_of_a_larger_volume():
    phantom = phantoms.make_phantom((192, 224, 48), config.VOXEL_SPACING, seed=[3])  # the demo preset's shape
    assert 0.005 < phantom.label.sum() / phantom.mask.sum() < 0.03


def test_vessels_brighter_than_tissue(internal, external):
    for phantom in (internal, external):
        label, brain = phantom.label == 1, (phantom.mask == 1) & (phantom.label == 0)
        assert phantom.img[label].mean() > 1.8 * phantom.img[brain].mean()


def test_rician_noise_in_the_air(internal):
    air = internal.img[:6, :6, :].astype(float)
    assert internal.mask[:6, :6, :].max() == 0
    # magnitude of complex Gaussian noise on zero signal is Rayleigh: mean / SD = 1.91
    assert 1.75 < air.mean() / air.std() < 2.1


def test_external_protocol_differs(internal, external):
    np.testing.assert_array_equal(internal.label, external.label)
    assert air_noise_sigma(external.img) > 1.3 * air_noise_sigma(internal.img)
    brain_internal = np.median(internal.img[(internal.mask == 1) & (internal.label == 0)])
    brain_external = np.median(external.img[(external.mask == 1) & (external.label == 0)])
    assert brain_external > 1.1 * brain_internal
    label = internal.label == 1
    assert np.median(contrast_to_noise(external, label)) < 0.8 * np.median(contrast_to_noise(internal, label))


def test_thin_vessels_exist_and_are_faint(internal, external):
    thin = thin_label(internal.label)
    assert thin.sum() > 0.2 * internal.label.sum()
    thick = (internal.label == 1) & ~thin
    for phantom in (internal, external):
        thin_cnr, thick_cnr = contrast_to_noise(phantom, thin), contrast_to_noise(phantom, thick)
        assert np.median(thin_cnr) < 0.6 * np.median(thick_cnr)
        assert np.mean(thin_cnr < 4) > 0.05  # some labelled vessels are barely above the noise
    # partial volume: voxels beside the label are brighter than tissue on average, but not as bright as vessels
    border = ndimage.binary_dilation(internal.label == 1) & (internal.label == 0) & (internal.mask == 1)
    assert 0.5 < np.median(contrast_to_noise(internal, border)) < np.median(contrast_to_noise(internal, thin))


def read(path):
    image = nib.load(path)
    return image, np.asarray(image.dataobj)


def test_script_writes_layout_skips_existing_and_refuses_partial(dirs, capsys):
    data_dir = dirs[0]
    make_phantoms.main(["--splits", "train", "test2"])
    for split in ("train", "test2"):
        assert patient_ids(split) == phantoms.phantom_ids(split)  # found from the files, in the order written
        for patient in phantoms.phantom_ids(split):
            paths = patient_paths(split, patient)
            img, img_data = read(paths["img"])
            (_, label), (_, mask) = read(paths["label"]), read(paths["mask"])
            assert (img_data.dtype, label.dtype, mask.dtype) == (np.float32, np.uint8, np.uint8)
            assert img_data.shape == label.shape == mask.shape == tuple(config.VOLUME_SHAPE)
            np.testing.assert_allclose(img.header.get_zooms(), config.VOXEL_SPACING)
            assert not np.any(label > mask) and label.sum() > 0
        assert phantoms.preview_path(data_dir, split).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (data_dir / "val").exists() and not phantoms.preview_path(data_dir, "val").exists()

    first = patient_paths("train", phantoms.phantom_ids("train")[0])
    stamps = {path: path.stat().st_mtime_ns for path in data_dir.rglob("*.nii.gz")}
    label_bytes = first["label"].read_bytes()
    capsys.readouterr()
    make_phantoms.main(["--splits", "train", "test2"])  # everything there: reused, nothing rewritten
    assert capsys.readouterr().out.count("exists, skipping") == len(phantoms.phantom_ids("train")) + 1
    assert stamps == {path: path.stat().st_mtime_ns for path in data_dir.rglob("*.nii.gz")}

    first["mask"].unlink()  # a partial patient
    with pytest.raises(SystemExit) as exit_info:
        make_phantoms.main(["--splits", "train"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert phantoms.phantom_ids("train")[0] in error and "--overwrite" in error
    assert not first["mask"].exists()

    make_phantoms.main(["--splits", "train", "--overwrite"])
    assert first["mask"].exists()
    assert first["label"].read_bytes() == label_bytes  # same seed, byte-identical files

    with pytest.raises(SystemExit):  # files of another seed are not silently taken as this one's
        make_phantoms.main(["--splits", "test2", "--seed", "7"])
    assert f"seed={config.PHANTOM_SEED} " in capsys.readouterr().err  # names the seed of the files found


def test_phantom_ids_sort_in_the_order_of_their_seeds(monkeypatch):
    """The pipeline finds a split's patients sorted by id; for the phantoms that is the order of their indices, the
    order they are written and seeded in (patches and everything after them depend on it)."""
    monkeypatch.setitem(config.N_PATIENTS, "test2", 120)
    ids = phantoms.phantom_ids("test2")
    assert ids[:2] == ["test2_000", "test2_001"] and ids[-1] == "test2_119" and len(ids) == 120
    assert sorted(ids) == ids
