"""utils/data.py: loading one patient's volumes and the checks that name the patient and file."""

import re

import nibabel as nib
import numpy as np
import pytest

import config
from utils.common import PipelineError
from utils.data import (
    Volume,
    load_patient,
    patient_ids,
    patient_paths,
    read_header,
    summary_table,
    survey_data,
    validate_split,
)
from utils.phantoms import phantom_ids

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
    """The phantoms' patients of the split (ids and count), patient i from seed i; returns {patient: arrays}."""
    volumes = {}
    for index, patient in enumerate(phantom_ids(split)):
        volumes[patient] = make_arrays(seed=index)
        write_patient(data_dir, split, patient, volumes[patient])
    return volumes


def test_load_patient_round_trip_from_config_data_dir(dirs):
    data, _, _ = dirs
    arrays = write_split(data)
    patient = phantom_ids("train")[1]
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
    assert [h.patient for h in headers] == phantom_ids("train")
    assert all(h.shape == config.VOLUME_SHAPE and h.spacing == SPACING for h in headers)


def test_validate_split_names_the_broken_patient(dirs):
    data, _, _ = dirs
    write_split(data)
    broken = phantom_ids("train")[-1]
    patient_paths("train", broken)["mask"].unlink()
    with pytest.raises(PipelineError, match=rf"patient {broken}: its mask file {broken}_mask.nii.gz is missing from "
                                            rf"folder {data / 'train'}$"):
        validate_split("train")


def test_missing_data_folder(dirs):
    with pytest.raises(PipelineError, match="data folder .* does not exist"):
        load_patient("train", "train_000")


def test_missing_split_folder(dirs):
    data, _, _ = dirs
    write_split(data, "train")
    with pytest.raises(PipelineError, match=rf"split folder {data / 'val'} does not exist: it should hold each val "
                                            r"patient's <patient>_img.nii.gz"):
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


def small_patient(data_dir, split, patient, shape=(4, 5, 3), affines=None):
    """A patient whose files hold little (only file names and headers matter to what reads them)."""
    write_patient(data_dir, split, patient, make_arrays(shape=shape), affines)


def test_patients_are_found_from_the_files_sorted_when_not_listed(dirs):
    data, _, _ = dirs
    assert config.PATIENT_IDS is None  # the default: every split's patients are found from its folder
    for patient in ("sub-10", "sub-02", "sub-1", "a_b_c"):
        small_patient(data, "val", patient)
    (data / "val" / ".DS_Store").write_text("a file manager's")
    (data / "val" / ".sub-3_img.nii.gz.a1b2c3d4.gz").write_bytes(b"")  # being written (utils.common.atomic_write)
    assert patient_ids("val") == ["a_b_c", "sub-02", "sub-1", "sub-10"]  # sorted, as strings
    assert [h.patient for h in validate_split("val")] == ["a_b_c", "sub-02", "sub-1", "sub-10"]
    small_patient(data, "other", "x")
    assert patient_ids("val", data_dir=data) == patient_ids("val")
    with pytest.raises(PipelineError, match="unknown split 'other'"):  # a folder is not a split: config.SPLITS
        patient_ids("other")


def test_a_listing_wins_for_the_splits_it_lists(dirs, monkeypatch):
    data, _, _ = dirs
    for split, patient in (("train", "p2"), ("train", "p1"), ("train", "unused"), ("val", "v1"), ("extra", "e1")):
        small_patient(data, split, patient)
    monkeypatch.setattr(config, "PATIENT_IDS", {"train": ["p2", "p1"], "extra": ["e1"]})
    assert patient_ids("train") == ["p2", "p1"]  # the listed ones, in the listed order
    assert patient_ids("val") == ["v1"]  # not listed: found from the files
    assert patient_ids("extra") == ["e1"]  # a listed split need not be in config.SPLITS
    (data / "train" / "notes.txt").write_text("a stray file does not matter where the ids are listed")
    assert [h.patient for h in validate_split("train")] == ["p2", "p1"]
    monkeypatch.setitem(config.PATIENT_IDS, "train", ["p1", "p3"])
    with pytest.raises(PipelineError, match=rf"^patient p3: none of its files \(p3_img.nii.gz, p3_label.nii.gz, "
                                            rf"p3_mask.nii.gz\) is in folder {data / 'train'}$"):
        validate_split("train")


@pytest.mark.parametrize("kind", ["img", "label", "mask"])
def test_a_patient_without_one_of_its_files_names_the_patient_the_file_and_the_folder(dirs, kind):
    data, _, _ = dirs
    for patient in ("a", "b"):
        small_patient(data, "test", patient)
    patient_paths("test", "b", data)[kind].unlink()
    with pytest.raises(PipelineError, match=rf"^patient b: its {kind} file b_{kind}.nii.gz is missing from folder "
                                            rf"{data / 'test'}$"):
        patient_ids("test")


def test_stray_files_and_empty_folders_are_errors_naming_the_folder(dirs):
    data, _, _ = dirs
    (data / "test").mkdir(parents=True)
    with pytest.raises(PipelineError, match=rf"split folder {data / 'test'} is empty"):
        patient_ids("test")
    small_patient(data, "test", "a")
    (data / "test" / "a_img.nii").write_bytes(b"")  # not compressed: not the layout
    (data / "test" / "scans").mkdir()
    patient_paths("test", "a", data)["label"].unlink()
    with pytest.raises(PipelineError) as error:
        patient_ids("test")
    lines = str(error.value).splitlines()  # every problem of the folder, each on its own line
    assert lines[0].startswith(f"3 problems in split folder {data / 'test'}")
    assert lines[1].strip().startswith(f"stray file a_img.nii in {data / 'test'}: every entry")
    assert lines[2].strip().startswith(f"stray folder scans in {data / 'test'}")
    assert lines[3].strip() == f"patient a: its label file a_label.nii.gz is missing from folder {data / 'test'}"


def test_survey_collects_every_problem_from_the_headers(dirs):
    data, _, _ = dirs
    write_split(data, "train")
    write_split(data, "val")
    patient_paths("train", "train_000")["mask"].unlink()
    small_patient(data, "val", "v_shape")
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 2), np.uint8), np.diag([*SPACING, 1.0])),
             patient_paths("val", "v_shape")["label"])
    small_patient(data, "val", "v_4d", shape=(4, 5, 3, 2))
    small_patient(data, "val", "v_pixdim")
    image = nib.load(patient_paths("val", "v_pixdim")["img"])
    image.header["pixdim"][3] = 0  # nibabel reads a 0 as 1 mm, while the affine says 0.7
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine, image.header),
             patient_paths("val", "v_pixdim")["img"])
    (data / "test").mkdir()
    checked = []
    surveys = {survey.split: survey for survey in survey_data(header_checks=[lambda header: checked.append(header)])}
    assert list(surveys) == list(config.SPLITS)
    assert [h.patient for h in checked] == [*phantom_ids("train")[1:], *phantom_ids("val")]  # those that passed
    assert surveys["train"].patients == phantom_ids("train") and [h.patient for h in surveys["train"].headers] == \
        phantom_ids("train")[1:]
    assert surveys["train"].problems == [f"patient train_000: its mask file train_000_mask.nii.gz is missing from "
                                         f"folder {data / 'train'}"]
    val = "\n".join(surveys["val"].problems)
    assert len(surveys["val"].problems) == 3
    assert re.search(r"patient v_shape: label .*v_shape_label.nii.gz has shape \(4, 5, 2\) but the image", val)
    assert re.search(r"patient v_4d: image .*v_4d_img.nii.gz has shape \(4, 5, 3, 2\), not 3-D", val)
    assert re.search(r"patient v_pixdim: image .*v_pixdim_img.nii.gz has voxel spacing \[0.5, 0.5, 1.0\] mm in its "
                     r"header \(pixdim\) but \[0.5, 0.5, 0.7\] mm in its affine", val)
    assert surveys["test"].problems == [f"split folder {data / 'test'} is empty: it should hold each patient's "
                                        f"<patient>_img.nii.gz, <patient>_label.nii.gz and <patient>_mask.nii.gz"]
    assert surveys["test2"].problems[0].startswith(f"split folder {data / 'test2'} does not exist")
    table = summary_table(surveys.values()).splitlines()
    assert table[0].split() == ["split", "patients", "shape(s),", "voxels", "voxel", "spacing(s)", "problems"]
    assert table[2].split() == ["train", str(len(phantom_ids("train"))), "128x128x16", "0.5x0.5x0.7", "mm", "1"]
    assert table[3].split()[:2] == ["val", str(len(phantom_ids("val")) + 3)] and table[3].split()[-1] == "3"
    assert table[5].split() == ["test2", "no", "folder", "-", "-", "1"]


def test_survey_reports_what_header_checks_refuse(dirs):
    data, _, _ = dirs
    small_patient(data, "train", "big", shape=(6, 5, 3))
    small_patient(data, "train", "small")

    def at_least_5_across(header):
        if header.shape[0] < 5:
            raise PipelineError(f"patient {header.patient}: too small")

    train = survey_data(header_checks=[at_least_5_across])[0]
    assert train.problems == ["patient small: too small"] and [h.patient for h in train.headers] == ["big", "small"]
    assert "6x5x3 (1), 4x5x3 (1)" in summary_table([train])


def test_survey_of_a_missing_data_folder(dirs):
    with pytest.raises(PipelineError, match="data folder .* does not exist"):
        survey_data()
