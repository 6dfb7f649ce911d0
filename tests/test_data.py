"""utils/data.py: loading one patient's volumes and the checks that name the patient and file."""

import nibabel as nib
import numpy as np
import pytest

import config
from utils.common import PipelineError
from utils.data import Volume, load_patient, patient_paths, read_header, validate_split

SPACING = (0.5, 0.5, 0.7)


def make_arrays(seed=0, shape=None):
    """img float32 with distinct values, a brain box mask and ~5% random vessel voxels inside it."""
    shape = config.VOLUME_SHAPE if shape is None else shape
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, np.uint8)
    mask[8:-8, 8:-8, :] = 1
    label = ((rng.random(shape) < 0.05) & (mask == 1)).astype(np.uint8)
    img = (rng.random(shape, dtype=np.float32) * 1000).astype(np.float32)
    return {"img": img, "label": label, "mask": mask}


def write_patient(data_dir, split, patient, arrays, affines=None):
    """Write arrays {'img', 'label', 'mask'} as NIfTI; affines may give one kind a different affine."""
    affines = affines or {}
    for kind, path in patient_paths(split, patient, data_dir).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(arrays[kind], affines.get(kind, np.diag([*SPACING, 1.0]))), path)


def write_split(data_dir, split="train"):
    """Every patient of the split, patient i from seed i; returns {patient: arrays}."""
    volumes = {}
    for index, patient in enumerate(config.PATIENT_IDS[split]):
        volumes[patient] = make_arrays(seed=index)
        write_patient(data_dir, split, patient, volumes[patient])
    return volumes


def test_load_patient_round_trip_from_config_data_dir(dirs):
    data, _, _ = dirs
    arrays = write_split(data)
    patient = config.PATIENT_IDS["train"][1]
    volume = load_patient("train", patient, skull_strip=False)  # data_dir defaults to config.DATA_DIR (monkeypatched)
    assert isinstance(volume, Volume)
    assert volume.patient == patient and volume.split == "train" and not volume.skull_stripped
    assert volume.img.dtype == np.float32 and volume.label.dtype == np.uint8 and volume.mask.dtype == np.uint8
    for kind in ("img", "label", "mask"):
        np.testing.assert_array_equal(getattr(volume, kind), arrays[patient][kind])
    assert volume.spacing == SPACING and all(isinstance(s, float) for s in volume.spacing)
    np.testing.assert_allclose(volume.affine, np.diag([*SPACING, 1.0]))


def test_patient_paths_layout(tmp_path):
    paths = patient_paths("val", "val_000", tmp_path)
    assert paths == {kind: tmp_path / "val" / f"val_000_{kind}.nii.gz" for kind in ("img", "label", "mask")}


def test_float_binary_label_is_accepted_as_uint8(dirs):
    data, _, _ = dirs
    arrays = make_arrays()
    arrays["label"] = arrays["label"].astype(np.float32)
    write_patient(data, "train", "p", arrays)
    volume = load_patient("train", "p")
    assert volume.label.dtype == np.uint8
    np.testing.assert_array_equal(volume.label, arrays["label"])


def test_validate_split_reads_every_header(dirs):
    data, _, _ = dirs
    write_split(data)
    headers = validate_split("train")
    assert [h.patient for h in headers] == config.PATIENT_IDS["train"]
    assert all(h.shape == config.VOLUME_SHAPE and h.spacing == SPACING for h in headers)


def test_validate_split_names_the_broken_patient(dirs):
    data, _, _ = dirs
    write_split(data)
    broken = config.PATIENT_IDS["train"][-1]
    patient_paths("train", broken)["mask"].unlink()
    with pytest.raises(PipelineError, match=rf"patient {broken}: mask file .*{broken}_mask.nii.gz does not exist"):
        validate_split("train")


def test_missing_data_folder(dirs):
    with pytest.raises(PipelineError, match="data folder .* does not exist"):
        load_patient("train", "train_000")


def test_missing_split_folder(dirs):
    data, _, _ = dirs
    write_split(data, "train")
    with pytest.raises(PipelineError, match=r"patient val_000: split folder .*val does not exist"):
        validate_split("val")


def test_unknown_split(dirs):
    with pytest.raises(PipelineError, match="unknown split 'training'"):
        validate_split("training")


def _broken(kind_of_damage):
    arrays = make_arrays()
    affines = {}
    if kind_of_damage == "shape":
        arrays["label"] = arrays["label"][:, :, :-1]
    elif kind_of_damage == "affine":
        affines["mask"] = np.diag([0.5, 0.5, 1.0, 1.0])
    elif kind_of_damage == "label values":
        arrays["label"][10, 10, 0] = 2
    elif kind_of_damage == "mask values":
        arrays["mask"] = arrays["mask"].astype(np.float32) * 0.5
    return arrays, affines


@pytest.mark.parametrize("damage, message", [
    ("shape", r"patient p: label .*p_label.nii.gz has shape \(128, 128, 15\) but the image .* has shape"),
    ("affine", r"patient p: the affine of mask .*p_mask.nii.gz differs from the image's"),
    ("label values", r"patient p: vessel label .*p_label.nii.gz is not binary \(values 0, 1, 2;"),
    ("mask values", r"patient p: brain mask .*p_mask.nii.gz is not binary \(values 0, 0.5;"),
])
def test_inconsistent_volumes_are_refused(dirs, damage, message):
    data, _, _ = dirs
    arrays, affines = _broken(damage)
    write_patient(data, "train", "p", arrays, affines)
    with pytest.raises(PipelineError, match=message):
        load_patient("train", "p")


def test_header_checks_catch_shape_and_affine_without_voxels(dirs):
    data, _, _ = dirs
    arrays, affines = _broken("affine")
    write_patient(data, "train", "p", arrays, affines)
    with pytest.raises(PipelineError, match="affine of mask"):
        read_header("train", "p")


def test_damaged_file_is_a_pipeline_error(dirs):
    data, _, _ = dirs
    write_patient(data, "train", "p", make_arrays())
    path = patient_paths("train", "p")["img"]
    path.write_bytes(path.read_bytes()[:2000])  # a truncated download
    with pytest.raises(PipelineError, match=r"patient p: .*p_img.nii.gz"):
        load_patient("train", "p")


@pytest.mark.parametrize("setting", [True, False])
def test_volumes_are_skull_stripped_as_the_authors_did_unless_switched_off(dirs, monkeypatch, setting):
    """config.SKULL_STRIP (default on): image and label x brain mask: no patch, prediction or score sees the scalp."""
    assert config.SKULL_STRIP is True  # the default, as the authors prepared their scans
    data, _, _ = dirs
    arrays = make_arrays(seed=3)
    arrays["label"][0, 0, :] = 1  # a "vessel" outside the brain (a scalp artery, or a label error)
    write_patient(data, "train", "p", arrays)
    monkeypatch.setattr(config, "SKULL_STRIP", setting)
    volume = load_patient("train", "p")
    assert volume.skull_stripped is setting and volume.img.dtype == np.float32 and volume.label.dtype == np.uint8
    outside = arrays["mask"] == 0
    if setting:
        assert not volume.img[outside].any() and not volume.label[outside].any()
        np.testing.assert_array_equal(volume.img, arrays["img"] * arrays["mask"])
        np.testing.assert_array_equal(volume.label, arrays["label"] * arrays["mask"])
    else:
        np.testing.assert_array_equal(volume.img, arrays["img"])
        assert volume.label[0, 0, 0] == 1
    np.testing.assert_array_equal(volume.mask, arrays["mask"])


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels_are_refused_naming_the_file_and_the_count(dirs, value):
    data, _, _ = dirs
    arrays = make_arrays(seed=4)
    arrays["img"][10, 10, 0] = arrays["img"][11, 12, 1] = value
    write_patient(data, "train", "p", arrays)
    with pytest.raises(PipelineError, match=r"p_img.nii.gz has 2 voxels that are NaN or infinite"):
        load_patient("train", "p")


def test_check_preparation_refuses_outputs_of_the_other_preparation_and_names_the_remedy(monkeypatch):
    from utils.data import check_preparation, stripped_of

    check_preparation(True, "U-Net x", "retrain")  # the same preparation passes
    with pytest.raises(PipelineError, match=r"U-Net x was made from raw \(not skull-stripped\) volumes.*`retrain`"):
        check_preparation(False, "U-Net x", "retrain")
    monkeypatch.setattr(config, "SKULL_STRIP", False)
    with pytest.raises(PipelineError, match=r"skull-stripped .* volumes, but config.SKULL_STRIP is False"):
        check_preparation(True, "U-Net x", "retrain")
    # outputs written before the setting existed record nothing: their volumes were raw
    assert stripped_of({}) is False and stripped_of({"skull_stripped": np.array(True)}) is True
