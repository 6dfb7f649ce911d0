"""Membership-inference audit (utils/audit.py, audit_privacy.py) on hand-made patches of known membership."""

import json

import numpy as np
import pytest

import audit_privacy
import config
from utils import audit
from utils.common import patches_path, save_npz

PER_PATIENT = 60


def patient_patches(patients, seed):
    """Noise images with a random bright disc each (labelled), PER_PATIENT per patient."""
    rng = np.random.default_rng(seed)
    n = PER_PATIENT * len(patients)
    yy, xx = np.mgrid[:96, :96]
    img = rng.normal(100, 20, (n, 96, 96)).astype(np.float32)
    label = np.zeros((n, 96, 96), np.uint8)
    for i in range(n):
        cy, cx, r = rng.integers(20, 76, 2).tolist() + [int(rng.integers(4, 12))]
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        label[i][disc], img[i][disc] = 1, img[i][disc] + 200
    return {"img": img, "label": label, "patient": np.repeat(np.array(patients), PER_PATIENT)}


@pytest.fixture(scope="module")
def groups():
    members = patient_patches(["m0", "m1", "m2", "m3"], 1)
    held_out = patient_patches(["h0", "h1", "h2", "h3"], 2)
    unseen = patient_patches(["u0", "u1", "u2", "u3"], 3)  # drawn like held-out patients, seen by nobody
    return members, held_out, unseen


def subset(pairs, index):
    return {k: v[index] for k, v in pairs.items()}


def test_a_memorising_set_is_found_with_auc_near_one_per_patch_and_per_patient(groups):
    members, held_out, _ = groups
    result, curves = audit.membership_audit(subset(members, slice(None)), members, held_out, seed=0)
    assert result["mia_auc"] >= 0.99 and result["mia_auc_ci95"][0] > 0.95
    assert result["patient_auc"] == 1.0
    assert result["membership_p_value"] == pytest.approx(1 / 70)  # 4 + 4 patients: the most extreme of C(8, 4)
    assert result["mia_tpr_at_1pct_fpr"] >= 0.99
    assert result["verdict"].startswith("membership leaks")
    assert result["critic_auc"].startswith("not computed")
    assert set(curves) == {"black box (calibrated nearest neighbour)",
                           "control (held-out patients vs held-out patients)"}


def test_a_copy_of_half_the_members_scores_about_three_quarters(groups):
    members, held_out, _ = groups
    half = np.random.default_rng(4).permutation(len(members["img"]))[: len(members["img"]) // 2]
    result, _ = audit.membership_audit(subset(members, half), members, held_out, seed=0)
    assert 0.68 <= result["mia_auc"] <= 0.82
    assert result["mia_tpr_at_1pct_fpr"] == pytest.approx(0.5, abs=0.12)  # the copied half, found with certainty


def test_a_set_of_unseen_patients_and_the_control_are_at_chance(groups):
    members, held_out, unseen = groups
    result, _ = audit.membership_audit(unseen, members, held_out, seed=0)
    assert result["mia_auc_ci95"][0] <= 0.5 <= result["mia_auc_ci95"][1]
    assert abs(result["mia_auc"] - 0.5) < 0.08
    assert result["control_ok"] and abs(result["control_auc"] - 0.5) < 0.1
    assert result["verdict"].startswith("no membership signal")


def test_a_control_between_patients_that_differ_is_reported_and_not_read_as_membership(groups):
    members, held_out, unseen = groups
    odd = {k: v.copy() for k, v in held_out.items()}
    h0_h2 = np.isin(odd["patient"], ["h0", "h2"])  # one control group: patients imaged otherwise (no vessels)
    odd["label"][h0_h2] = 0
    odd["img"][h0_h2] = np.random.default_rng(8).normal(100, 20, odd["img"][h0_h2].shape)
    result, _ = audit.membership_audit(unseen, members, odd, seed=0)
    # the control reports that these patients differ; the membership test, which allows for it, decides
    assert result["control_ok"] is False and "these patients differ" in result["verdict"]
    assert result["verdict"].startswith("no membership signal")


def test_white_box_critic_scores_are_used_when_given(groups):
    members, held_out, _ = groups
    member_ids = {id_ for id_ in np.unique(members["patient"])}
    # an oracle critic that knows the members: the white-box AUC must be 1
    lookup = {members["img"][i].tobytes(): 1.0 for i in range(len(members["img"]))}
    result, curves = audit.membership_audit(
        held_out, members, held_out, seed=0,
        critic_score=lambda img, label: np.array([lookup.get(x.tobytes(), 0.0) for x in img]))
    assert result["critic_auc"] == 1.0 and "white box (critic score; internal)" in curves
    assert member_ids == set(result["member_patients"])


DEMO_PATCH, DEMO_PER_PATIENT = 32, 40


def varied_patients(ids, rng):
    """Patients who differ, as real ones do: each has his own vessel (disc) size and brightness, so that his
    patches resemble each other more than another patient's."""
    yy, xx = np.mgrid[:DEMO_PATCH, :DEMO_PATCH]
    n = DEMO_PER_PATIENT * len(ids)
    img = rng.normal(100, 20, (n, DEMO_PATCH, DEMO_PATCH)).astype(np.float32)
    label = np.zeros((n, DEMO_PATCH, DEMO_PATCH), np.uint8)
    for k in range(len(ids)):
        radius, brightness = rng.uniform(3, 13), rng.uniform(100, 300)
        for i in range(k * DEMO_PER_PATIENT, (k + 1) * DEMO_PER_PATIENT):
            cy, cx = rng.integers(6, DEMO_PATCH - 6, 2).tolist()
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 < max(2.0, rng.normal(radius, 1)) ** 2
            label[i][disc], img[i][disc] = 1, img[i][disc] + brightness
    return {"img": img, "label": label, "patient": np.repeat(np.array(ids), DEMO_PER_PATIENT)}


def test_on_demo_shaped_patients_held_out_patients_never_read_as_leaks_and_a_copy_of_the_training_set_does():
    """The demo's 6 training and 4 held-out patients (small arrays): a set of two other patients' patches holds no
    member; the patch-level figures treated patches as independent and read "leaks" for draws 6, 7 and 10."""
    for draw in range(5, 11):
        rng = np.random.default_rng(draw)
        members = varied_patients([f"train_{i:03d}" for i in range(6)], rng)
        held_out = varied_patients(["val_000", "val_001", "test_000", "test_001"], rng)
        other_patients = varied_patients(["test2_000", "test2_001"], rng)
        result, _ = audit.membership_audit(other_patients, members, held_out, seed=draw)
        assert result["membership_test"]["assignments"] == 210
        assert result["verdict"].startswith("no membership signal"), (draw, result["verdict"])
    result, _ = audit.membership_audit(members, members, held_out, seed=0)
    assert result["membership_p_value"] == pytest.approx(1 / 210) and result["verdict"].startswith("membership leaks")


def test_on_the_tiny_preset_every_set_is_too_few_patients_to_tell(phantom_dirs):
    """Tiny: 2 training and 2 held-out patients, 6 assignments, p >= 1/6. The test2 patients' patches (no member)
    read "membership leaks" before; now they, like a copy of the training patches, claim nothing."""
    import extract_patches

    for split in config.SPLITS:
        if split != "train":  # the phantoms come with their training patches
            extract_patches.main(["--split", split])
    for name in ("test2", "train"):
        result = audit_privacy.main(["--synthetic", str(patches_path(name)), "--device", "cpu"])
        assert result["verdict"].startswith("too few patients to tell"), result["verdict"]
        assert result["membership_test"]["smallest_attainable_p"] == pytest.approx(1 / 6)
        assert "leaks" not in result["verdict"]


@pytest.fixture
def workspace(dirs, groups, monkeypatch):
    members, held_out, _ = groups
    # patches files without a data folder: the held-out patients are those listed
    monkeypatch.setattr(config, "PATIENT_IDS", {"val": ["h0", "h1"], "test": ["h2", "h3"]})
    stripped = np.array(True)  # cut from skull-stripped volumes, as config.SKULL_STRIP reads them
    save_npz(patches_path("train"), **members, skull_stripped=stripped)
    val, test = (subset(held_out, np.isin(held_out["patient"], ids)) for ids in (["h0", "h1"], ["h2", "h3"]))
    save_npz(patches_path("val"), **val, skull_stripped=stripped)
    save_npz(patches_path("test"), **test, skull_stripped=stripped)
    synthetic = dirs[1] / "sets" / "copy.npz"
    save_npz(synthetic, img=members["img"][..., None] * 1.0, label=members["label"][..., None])
    return synthetic


def test_training_patches_prepared_otherwise_than_the_held_out_ones_are_refused(workspace, groups, capsys):
    """Members cut from raw scans and non-members from stripped ones would differ by preparation, not membership."""
    save_npz(patches_path("train"), **groups[0])  # records nothing: cut from raw scans
    with pytest.raises(SystemExit):
        audit_privacy.main(["--synthetic", str(workspace), "--device", "cpu"])
    err = capsys.readouterr().err
    assert f"training patches {patches_path('train')} was made from raw (not skull-stripped) volumes" in err
    assert not audit.audit_paths("copy")[0].exists()


def test_audit_privacy_writes_the_json_and_the_roc_figure(workspace):
    result = audit_privacy.main(["--synthetic", str(workspace), "--device", "cpu"])
    json_path, roc_path = audit.audit_paths("copy")
    saved = json.loads(json_path.read_text())
    for key in ("mia_auc", "mia_auc_ci95", "mia_tpr_at_1pct_fpr", "mia_tpr_at_0.1pct_fpr", "patient_auc",
                "patient_auc_ci95", "control_auc", "critic_auc", "threat_model", "verdict"):
        assert key in saved, key
    assert saved["mia_auc"] == result["mia_auc"] >= 0.95
    assert roc_path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"), ("shape", "expected N x 96 x 96"), ("no_held_out", "needs held-out patients"),
    ("both", "either --trial"),
])
def test_bad_input_stops_before_anything_is_written(workspace, monkeypatch, capsys, case, message):
    argv = ["--synthetic", str(workspace)]
    if case == "missing":
        argv = ["--synthetic", str(workspace.with_name("none.npz"))]
    elif case == "shape":
        save_npz(workspace, img=np.zeros((3, 64, 64), np.float32), label=np.zeros((3, 64, 64), np.uint8))
    elif case == "no_held_out":
        monkeypatch.setattr(config, "PATIENT_IDS", {"val": [], "test": []})
    else:
        argv += ["--trial", "T"]
    with pytest.raises(SystemExit):
        audit_privacy.main(argv)
    assert message in capsys.readouterr().err
    assert not (config.WORK_DIR / "results").exists()


def test_the_white_box_attack_loads_the_critic_of_the_trials_recipe(workspace):
    import generate_samples
    import run_gan

    run_gan.main(["--trial", "w", "--epochs", "1", "--noisem", "inf", "--arch", "dcgan", "--ngf", "2", "--ndf", "4",
                  "--loss", "ns", "--optimizer", "adam", "--label_scale", "pm1"])
    generate_samples.main(["--trial", "w", "--epoch", "0", "--n_samples", "40"])
    result = audit_privacy.main(["--trial", "w", "--epoch", "0", "--device", "cpu"])
    assert 0 <= result["critic_auc"] <= 1 and 0 <= result["mia_auc"] <= 1
