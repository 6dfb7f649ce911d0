"""utils/patches.py and extract_patches.py on tiny NIfTI volumes (tiny preset: 2 patients, 128x128x16)."""

import re
import shutil

import numpy as np
import pytest
from test_data import make_arrays, write_patient, write_split

import config
import extract_patches
from utils.common import PipelineError, load_npz, patches_path
from utils.data import patient_paths
from utils.patches import draw_centres, ensure_patches, extract_split, montage_path, patient_rng, recorded_preparation
from utils.phantoms import phantom_ids

HALF = config.PATCH_SIZE // 2
KEYS = ("img", "label", "patient", "centre")


def run_script(capsys, *args):
    """Run extract_patches.main in-process; returns (exit code, stdout, stderr)."""
    try:
        extract_patches.main(list(args))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_patches_file_matches_the_volumes(dirs, capsys):
    data, work, _ = dirs
    volumes = write_split(data)
    code, out, _ = run_script(capsys)
    assert code == 0
    patches = load_npz(patches_path("train"), KEYS)
    n, n_vessel = config.PATCHES_PER_PATIENT, config.VESSEL_PATCHES_PER_PATIENT
    patients = phantom_ids("train")
    assert f"{n * len(patients)} patches" in out and str(patches_path("train")) in out
    assert patches["img"].shape == (n * len(patients), config.PATCH_SIZE, config.PATCH_SIZE)
    assert patches["img"].dtype == np.float32 and patches["label"].dtype == np.uint8
    assert patches["centre"].dtype == np.int32 and patches["centre"].shape == (n * len(patients), 3)
    assert set(np.unique(patches["label"])) == {0, 1}
    shape = np.array(config.VOLUME_SHAPE)
    for index, patient in enumerate(patients):
        rows = np.flatnonzero(patches["patient"] == patient)
        np.testing.assert_array_equal(rows, np.arange(index * n, (index + 1) * n))
        centres = patches["centre"][rows]
        assert len(np.unique(centres, axis=0)) == n, "a centre was used twice"
        assert (centres[:, :2] - HALF >= 0).all() and (centres[:, :2] + HALF <= shape[:2]).all()
        assert ((centres[:, 2] >= 0) & (centres[:, 2] < shape[2])).all()
        volume = {**volumes[patient], "img": volumes[patient]["img"] * volumes[patient]["mask"],
                  "label": volumes[patient]["label"] * volumes[patient]["mask"]}  # skull-stripped (config default)
        x, y, z = centres.T
        assert (volume["label"][x[:n_vessel], y[:n_vessel], z[:n_vessel]] == 1).all()
        assert (volume["mask"][x[n_vessel:], y[n_vessel:], z[n_vessel:]] == 1).all()
        for row, (cx, cy, cz) in zip(rows, centres):
            window = np.s_[cx - HALF:cx + HALF, cy - HALF:cy + HALF, cz]
            np.testing.assert_array_equal(patches["img"][row], volume["img"][window])
            np.testing.assert_array_equal(patches["label"][row], volume["label"][window])
    assert montage_path("train").is_file() and montage_path("train").read_bytes()[:4] == b"\x89PNG"
    assert patches["skull_stripped"] and recorded_preparation(patches_path("train")) and "skull-stripped" in out


def test_patches_of_raw_volumes_say_so_and_are_refused_where_volumes_are_read_stripped(dirs, capsys, monkeypatch):
    data, _, _ = dirs
    volumes = write_split(data)
    monkeypatch.setattr(config, "SKULL_STRIP", False)
    assert run_script(capsys)[0] == 0
    patches = load_npz(patches_path("train"), KEYS)
    assert not patches["skull_stripped"] and not recorded_preparation(patches_path("train"))
    first = phantom_ids("train")[0]
    x, y, z = patches["centre"][0]
    window = np.s_[x - HALF:x + HALF, y - HALF:y + HALF, z]
    np.testing.assert_array_equal(patches["img"][0], volumes[first]["img"][window])  # the scalp is still there
    monkeypatch.setattr(config, "SKULL_STRIP", True)
    with pytest.raises(PipelineError, match="made from raw .* volumes, but config.SKULL_STRIP is True"):
        ensure_patches("train")


def test_same_seed_same_patches_other_seed_differs(dirs):
    data, _, _ = dirs
    write_split(data)
    first, again, other = (extract_split("train", seed) for seed in (5, 5, 6))
    for key in KEYS:
        np.testing.assert_array_equal(first[key], again[key])
    assert not np.array_equal(first["centre"], other["centre"])


def test_each_patient_draws_from_its_own_rng(dirs):
    """Patient i's centres depend only on (seed, i): redrawing one patient alone gives the same centres."""
    data, _, _ = dirs
    volumes = write_split(data)
    patches = extract_split("train", 9)
    n = config.PATCHES_PER_PATIENT
    volume = volumes[phantom_ids("train")[1]]
    alone = draw_centres(volume["label"], volume["mask"], n, config.VESSEL_PATCHES_PER_PATIENT,
                         patient_rng(9, 1), "p")
    np.testing.assert_array_equal(alone, patches["centre"][n:2 * n])


def _exact_pools(n_vessel, n_other_brain):
    """Volumes with exactly n_vessel vessel voxels (in the mask) and n_other_brain more mask voxels, all fitting."""
    shape = config.VOLUME_SHAPE
    label, mask = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    # Vessel and mask voxels where no patch fits must never be chosen, so put some on the border too.
    label[0, :, 0] = label[-1, :, 0] = mask[0, :, 0] = 1
    block = (8, 8, shape[2])  # a block of voxels whose patches all fit
    x, y, z = np.unravel_index(np.arange(n_vessel + n_other_brain), block)
    mask[x + HALF, y + HALF, z] = 1
    label[x[:n_vessel] + HALF, y[:n_vessel] + HALF, z[:n_vessel]] = 1
    return label, mask


def test_brain_centres_never_reuse_vessel_centres():
    n_vessel, n_brain = 20, 20
    label, mask = _exact_pools(n_vessel, n_brain)  # the brain pool is the vessels plus exactly n_brain others
    centres = draw_centres(label, mask, n_vessel + n_brain, n_vessel, patient_rng(0, 0), "p")
    x, y, z = centres.T
    assert (label[x[:n_vessel], y[:n_vessel], z[:n_vessel]] == 1).all()
    assert (label[x[n_vessel:], y[n_vessel:], z[n_vessel:]] == 0).all()
    assert len(np.unique(centres, axis=0)) == n_vessel + n_brain

    label, mask = _exact_pools(n_vessel, n_brain - 1)
    with pytest.raises(PipelineError, match=rf"patient p: only {n_brain - 1} brain-mask voxels where a 96x96"):
        draw_centres(label, mask, n_vessel + n_brain, n_vessel, patient_rng(0, 0), "p")


def _damage(data, damage):
    """Write the train split with one damage to its second patient; returns that patient."""
    write_split(data)
    patient = phantom_ids("train")[1]
    arrays, affines = make_arrays(seed=1), {}
    paths = patient_paths("train", patient, data)
    if damage == "missing folder":
        shutil.rmtree(paths["img"].parent)
        return None  # no patient is named: there are none
    if damage == "missing file":
        paths["label"].unlink()
        return patient
    if damage == "shape":
        arrays["mask"] = arrays["mask"][:, :-2]
    elif damage == "affine":
        affines["label"] = np.diag([0.5, 0.5, 0.8, 1.0])
    elif damage == "label values":
        arrays["label"] = arrays["label"] * 255
    elif damage == "small":
        arrays = make_arrays(seed=1, shape=(config.PATCH_SIZE - 1, 128, 16))
    elif damage == "few vessels":
        # Plenty of vessel voxels, but only 3 where a whole patch fits.
        arrays["label"][HALF:-HALF + 1, HALF:-HALF + 1] = 0
        arrays["label"][HALF, HALF, :3] = 1
    write_patient(data, "train", patient, arrays, affines)
    return patient


@pytest.mark.parametrize("damage, message", [
    ("missing folder", r"split folder .*train does not exist"),
    ("missing file", r"label file train_001_label.nii.gz is missing from folder .*train$"),
    ("shape", r"mask .* has shape \(128, 126, 16\) but the image"),
    ("affine", r"the affine of label .* differs"),
    ("label values", r"vessel label .* is not binary \(values 0, 255;"),
    ("small", r"volume of shape \(95, 128, 16\) is smaller than a 96x96 patch"),
    ("few vessels", r"only 3 vessel voxels where a 96x96 patch fits, but 20 vessel-centred patches"),
])
def test_bad_data_is_refused_before_anything_is_written(dirs, capsys, damage, message):
    data, work, _ = dirs
    patient = _damage(data, damage)
    code, _, err = run_script(capsys)
    assert code == 2
    error = err.strip().splitlines()[-1]  # after the progress bar, which tqdm closes with a line break
    assert error.startswith(f"error: patient {patient}: " if patient else "error: "), err
    assert re.search(message, error), err
    assert not work.exists() or not any(work.rglob("*")), "something was written"


def test_missing_data_folder(dirs, capsys):
    code, _, err = run_script(capsys, "--split", "val")
    assert code == 2 and "data folder" in err and "does not exist" in err


@pytest.mark.parametrize("args, message", [
    (("--n_vessel", "41"), "--n_vessel 41: must be between 0 and --n_per_patient (40)"),
    (("--n_per_patient", "0"), "--n_per_patient 0: must be at least 1"),
    (("--split", "training"), "unknown split 'training'"),
])
def test_bad_flags(dirs, capsys, args, message):
    data, work, _ = dirs
    write_split(data)
    code, _, err = run_script(capsys, *args)
    assert code == 2 and message in err
    assert not work.exists()


def test_existing_output_needs_overwrite(dirs, capsys):
    data, _, _ = dirs
    write_split(data)
    write_split(data, "val")
    assert run_script(capsys, "--split", "val", "--seed", "1")[0] == 0
    path = patches_path("val")
    before = path.read_bytes()
    code, _, err = run_script(capsys, "--split", "val", "--seed", "2")
    assert code == 2 and "exists already; pass --overwrite" in err
    assert path.read_bytes() == before
    assert run_script(capsys, "--split", "val", "--seed", "2", "--overwrite")[0] == 0
    replaced = load_npz(path, KEYS)
    assert len(replaced["img"]) == config.PATCHES_PER_PATIENT * len(phantom_ids("val"))
    assert path.read_bytes() != before
    assert sorted(p.name for p in path.parent.iterdir()) == ["val_montage.png", "val_patches.npz"]


def test_counts_can_be_overridden(dirs, capsys):
    data, _, _ = dirs
    write_split(data)
    assert run_script(capsys, "--n_per_patient", "10", "--n_vessel", "0")[0] == 0
    patches = load_npz(patches_path("train"), KEYS)
    assert len(patches["img"]) == 10 * len(phantom_ids("train"))


def test_check_passes_on_the_phantoms_and_writes_nothing(dirs, phantom_folder, capsys, monkeypatch):
    data, work = phantom_folder / "data", dirs[1]
    monkeypatch.setattr(config, "DATA_DIR", data)  # the shared phantoms, read only: the check writes nothing
    before = sorted(data.rglob("*"))
    code, out, err = run_script(capsys, "--check")
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()]
    shape, spacing = "x".join(map(str, config.VOLUME_SHAPE)), "x".join(f"{v:g}" for v in config.VOXEL_SPACING)
    for split in config.SPLITS:
        assert [split, str(len(phantom_ids(split))), shape, spacing, "mm", "0"] in rows
    assert f"{sum(len(phantom_ids(s)) for s in config.SPLITS)} patients in {len(config.SPLITS)} splits" in out
    assert sorted(data.rglob("*")) == before and not work.exists()


def test_check_lists_every_problem_of_a_broken_folder(dirs, capsys):
    data, work, _ = dirs
    write_split(data, "train")
    write_split(data, "val")
    write_split(data, "test")
    patient_paths("train", "train_000", data)["mask"].unlink()
    arrays = make_arrays(seed=1)
    arrays["label"] = arrays["label"][:, :-2]
    write_patient(data, "train", "train_001", arrays)
    write_patient(data, "val", "small", make_arrays(shape=(config.PATCH_SIZE - 1, 128, 16)))
    code, out, err = run_script(capsys, "--check")
    assert code == 2
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:] if line.split()}
    assert rows["train"][-1] == "2" and rows["val"][-1] == "1" and rows["test"][-1] == "0"
    assert rows["test2"][1:3] == ["no", "folder"]
    lines = err.strip().splitlines()
    assert lines[0] == f"error: 4 problem(s) in {data}; fix them before any step reads it:"
    folder = data / "train"
    assert lines[1].strip() == f"train: patient train_000: its mask file train_000_mask.nii.gz is missing from " \
                               f"folder {folder}"
    assert re.fullmatch(r"train: patient train_001: label .*train_001_label.nii.gz has shape \(128, 126, 16\) but "
                        r"the image .* has shape \(128, 128, 16\)", lines[2].strip())
    assert lines[3].strip() == "val: patient small: volume of shape (95, 128, 16) is smaller than a 96x96 patch in " \
                               "x or y"
    assert lines[4].strip().startswith(f"test2: split folder {data / 'test2'} does not exist")
    assert not work.exists()
