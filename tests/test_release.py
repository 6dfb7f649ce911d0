"""The release bundle (utils/release.py) written by generate_samples.py after real tiny GAN runs and from hand-made
trials (a checkpoint with a given accountant)."""

import json
import os
import socket
from types import SimpleNamespace

import pytest
import torch

import generate_samples
import run_gan
from utils import privacy, release
from utils.common import PipelineError, gan_results_dir, synthetic_name, synthetic_path
from utils.gan_checkpoints import build_generator, checkpoint_path
from utils.gan_log import read_log
from utils.privacy import PRV_EPS_ERROR
from utils.release import PAPER_COUNT_KEY, RELEASE_FILES, release_dir
from utils.synthesis import BEST_EPOCH

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing", "ignore:Secure RNG turned off")


@pytest.fixture
def work(dirs):
    from tests.test_gan import write_patches

    write_patches()
    return dirs[1]


def readme_words(folder):
    """The bundle's README.txt with its line breaks and indents as single spaces (its paragraphs are wrapped)."""
    return " ".join((folder / "README.txt").read_text().split())


def release_after_training(trial, *flags, epochs=3, epoch=BEST_EPOCH):
    run_gan.main(["--trial", trial, "--epochs", str(epochs), *flags])
    return released_set(trial, epoch), read_log(gan_results_dir(trial) / "log.csv")


def released_set(trial, epoch):
    """generate_samples.py for `epoch` of `trial` (6 pairs); returns the release bundle's folder."""
    generate_samples.main(["--trial", trial, "--epoch", str(epoch), "--n_samples", "6"])
    return release_dir(synthetic_name(trial, epoch, 0.8))


@pytest.fixture(scope="module")
def private_run(shared_folder):
    """Trial "p": three private epochs (noise 1) on write_patches(), released at epoch 9999 (the pick among them:
    best) and at epoch 2, made once. Its folder (root), the two bundles and log.csv; tests that change it copy it."""
    from tests.test_gan import write_patches

    def build():
        write_patches()
        best, log = release_after_training("p", "--noisem", "1.0")
        return SimpleNamespace(best=best, epoch_2=released_set("p", 2), log=log)

    root, run = shared_folder("private_run", build)
    run.root = root
    return run


def test_private_run_epoch_9999_releases_four_files_with_the_last_epochs_valid_epsilon(private_run):
    folder, log = private_run.best, private_run.log
    assert sorted(p.name for p in folder.iterdir()) == sorted(RELEASE_FILES)
    statement = json.loads((folder / "privacy.json").read_text())
    assert statement["epsilon"] == pytest.approx(log[-1]["epsilon_valid"], rel=1e-9)
    assert statement["epsilon_prv"] == pytest.approx(log[-1]["epsilon_valid_prv"], abs=PRV_EPS_ERROR)
    assert statement["epsilon_prv"] < statement["epsilon"]
    assert statement["steps"] == log[-1]["steps"]
    assert (statement["privacy_unit"], statement["epochs_trained"], statement["dp_mode"]) == ("patch", 3, "strict")
    assert statement["selection"]["privacy_of_epoch"] == 2 and statement["seeded"] is True
    assert statement["per_patient"]["group_size"] == 32  # write_patches: every patch of one patient
    for key in ("delta", "accountant", "noise_multiplier", "max_norm_dp", "sample_rate", "n_samples",
                "epoch_released", "versions"):
        assert key in statement, key
    assert PAPER_COUNT_KEY not in statement and "guarantee" not in statement

    saved = torch.load(folder / "generator.pt", weights_only=True)
    assert set(saved) == {"state_dict", "model_args"}
    assert set(saved["model_args"]) == set(release.GENERATOR_ARGS)
    generator = build_generator(saved["model_args"])
    generator.load_state_dict(saved["state_dict"])  # every key is the generator's: no critic, no RNG state
    readme = readme_words(folder)
    assert "ONE training patch" in readme and "does NOT cover" in readme and "seeded generator" in readme


def test_non_private_and_paper_mode_statements(work):
    folder, _ = release_after_training("np", "--noisem", "inf", epochs=1, epoch=0)
    statement = json.loads((folder / "privacy.json").read_text())
    assert statement["epsilon"] == "inf" and statement["guarantee"].startswith("none")
    assert "NO differential privacy guarantee" in readme_words(folder)

    folder, log = release_after_training("pp", "--noisem", "2", "--dp_mode", "paper", epochs=1, epoch=0)
    statement = json.loads((folder / "privacy.json").read_text())
    assert statement["epsilon"] == pytest.approx(log[-1]["epsilon_valid"])
    assert statement[PAPER_COUNT_KEY] == pytest.approx(log[-1]["epsilon"])


def test_secure_rng_is_recorded_nowhere_and_draws_other_noise(work):
    folder, _ = release_after_training("s1", "--noisem", "1.0", "--secure_rng", epochs=1, epoch=0)
    assert json.loads((folder / "privacy.json").read_text())["seeded"] is False
    assert "operating system's entropy" in readme_words(folder)
    other, _ = release_after_training("s2", "--noisem", "1.0", "--secure_rng", epochs=1, epoch=0)
    released = [torch.load(bundle / "generator.pt", weights_only=True) for bundle in (folder, other)]
    # Same --seed (same initialisation and fake draws), other noise and batches: other generators.
    assert any(not torch.equal(a, b) for a, b in zip(*(r["state_dict"].values() for r in released)))


def test_existing_bundle_is_refused_before_anything_is_written(private_run, copy_shared, capsys):
    copy_shared(private_run.root)
    folder = release_dir(private_run.epoch_2.name)
    before = (folder / "privacy.json").read_bytes()
    (folder.parent.parent / "synthetic" / f"gen_patches_{folder.name}.npz").unlink()
    with pytest.raises(SystemExit):
        generate_samples.main(["--trial", "p", "--epoch", "2", "--n_samples", "6"])
    assert "exists already" in capsys.readouterr().err and (folder / "privacy.json").read_bytes() == before
    generate_samples.main(["--trial", "p", "--epoch", "2", "--n_samples", "4", "--overwrite"])
    assert json.loads((folder / "privacy.json").read_text())["n_synthetic_pairs"] == 4


def test_missing_accountant_checkpoint_is_a_clear_error(private_run, copy_shared):
    copy_shared(private_run.root)
    checkpoint_path("p", 1).unlink()
    with pytest.raises(PipelineError, match="epoch_1.pth"):
        release.trial_privacy("p", {"args": {"noisem": 1.0}}, 1)


def test_a_warm_started_run_names_its_public_checkpoint_and_the_assumption_its_epsilon_rests_on(private_run, work):
    from tests.test_gan import train_public
    from utils.common import file_sha256

    public = train_public(work)
    folder, log = release_after_training("warm", "--noisem", "1.0", "--init_from", str(public), epochs=1)
    statement = json.loads((folder / "privacy.json").read_text())
    assert statement["initialised_from"]["sha256"] == file_sha256(public)
    assert "public data" in statement["initialised_from"]["assumption"]
    assert statement["epsilon"] == pytest.approx(log[-1]["epsilon_valid"], rel=1e-9)
    assert f"Warm start: {release.PUBLIC_INIT_ASSUMPTION}" in readme_words(folder)
    assert "initialised_from" not in json.loads((private_run.best / "privacy.json").read_text())  # a cold start


# ---- the README and privacy.json of hand-made trials (no training: a checkpoint with a given accountant) ----
def hand_made_trial(trial, patch_size=96, privacy_unit="patch", n_units=400, n_samples=400, delta=None,
                    noisem=1.0, sample_rate=0.02, steps_per_epoch=50, epochs=3):
    """A trial as run_gan.py leaves it (a small dcgan generator of `patch_size`, config.json, log.csv, a checkpoint
    per epoch) whose accountant saw `steps_per_epoch` strict steps per epoch at `sample_rate` over `n_units`
    units of `privacy_unit`, delta 1 / n_units unless given."""
    import csv

    from utils.common import gan_model_dir
    from utils.gan_log import LOG_COLUMNS

    delta = 1 / n_units if delta is None else delta
    model_args = {"arch": "dcgan", "ngf": 1, "latent_dim": 8, "label_scale": "pm1", "patch_size": patch_size,
                  "ndf": 2}
    generator = build_generator(model_args)
    models, results = gan_model_dir(trial), gan_results_dir(trial)
    models.mkdir(parents=True)
    results.mkdir(parents=True)
    rows = []
    for epoch in range(epochs):
        history = [(noisem, sample_rate, steps_per_epoch * (epoch + 1))]
        torch.save({"epoch": epoch, "generator": generator.state_dict(), "model_args": model_args,
                    "accountant": {"history": history, "generator_updates": steps_per_epoch * (epoch + 1),
                                   "sample_rate": sample_rate, "delta": delta, "dp_mode": "strict"}},
                   models / f"epoch_{epoch}.pth")
        eps = privacy.epsilon_from_history(history, delta)
        rows.append([epoch, 0.1, 1.0 - epoch / 10, 0, 0, 0, eps, eps, eps, 0.5, 1.0, 20.0, history[0][2],
                     history[0][2], 1, 1.0])
    (results / "config.json").write_text(json.dumps({
        "args": {"trial": trial, "noisem": noisem, "dp_mode": "strict", "max_norm_dp": 1.0, "n_discr": 1},
        "n_samples": n_samples, "delta": delta, "sample_rate": sample_rate, "privacy_unit": privacy_unit,
        "n_units": n_units, "n_accounted": n_units, "patches_per_patient_max": 40, "seeded": True}))
    with open(results / "log.csv", "w", newline="") as f:
        csv.writer(f).writerows([LOG_COLUMNS, *rows])


def bundle_of(trial, *flags):
    generate_samples.main(["--trial", trial, "--epoch", "2", "--n_samples", "4", *flags])
    folder = release_dir(synthetic_name(trial, 2, 0.8))
    return json.loads((folder / "privacy.json").read_text()), readme_words(folder)


def test_the_readme_of_a_64_pixel_set_says_64_and_its_shapes_from_privacy_json(dirs, monkeypatch):
    import config

    monkeypatch.setattr(config, "PATCH_SIZE", 64)  # the demo preset's patches
    hand_made_trial("d64", patch_size=64)
    statement, readme = bundle_of("d64")
    assert statement["patch_size"] == [64, 64]
    assert statement["arrays"] == {"img": {"shape": [4, 64, 64, 1], "dtype": "float32"},
                                   "label": {"shape": [4, 64, 64, 1], "dtype": "uint8"}}
    assert "ONE training patch (a 64 x 64 axial slice patch)" in readme
    assert "img (4 x 64 x 64 x 1, float32, 0-255), label (4 x 64 x 64 x 1, uint8, 0/1)" in readme
    assert "96" not in readme
    assert statement["delta"] == 1 / 400 and statement["delta_rule"].startswith("1 / N with N = 400 training patches")
    assert f"delta = {statement['delta']:.3g}: 1 / N with N = 400 training patches" in readme


def test_the_readme_of_a_patient_level_run_speaks_of_patients_and_their_delta(dirs):
    hand_made_trial("pl", privacy_unit="patient", n_units=41, n_samples=41 * 40, sample_rate=4 / 41)
    statement, readme = bundle_of("pl")
    assert statement["privacy_unit"] == "patient" and statement["delta"] == 1 / 41
    assert statement["sample_rate_unit"] == "Poisson-sampled patients per step / training patients"
    assert statement["delta_rule"].startswith("1 / N with N = 41 training patients")
    assert "ONE training patient (all of his patches)" in readme
    assert f"Poisson sampling rate {4 / 41:.4g} over 41 training patients (1640 patches)" in readme
    assert f"delta = {1 / 41:.3g}: 1 / N with N = 41 training patients" in readme
    assert "number of training patches" not in readme


def test_the_readme_of_a_run_with_config_delta_gives_that_delta_and_says_where_it_came_from(dirs):
    hand_made_trial("d6", delta=1e-6)
    statement, readme = bundle_of("d6")
    assert statement["delta"] == 1e-6 and statement["delta_rule"].startswith("config.DELTA = 1e-06")
    assert statement["epsilon"] == pytest.approx(privacy.epsilon_from_history([(1.0, 0.02, 150)], 1e-6))
    assert "delta = 1e-06: config.DELTA = 1e-06, set for the run" in readme
    assert f"({statement['epsilon']:.3g}, 1e-06)-differentially private" in readme
    assert "1 / number of training patches" not in readme and "the paper's choice" not in readme


def test_a_set_chosen_among_runs_carries_their_composed_epsilon_beside_its_own(dirs):
    from opacus.accountants import RDPAccountant

    import config

    for trial, noisem in (("s12", 1.0), ("s13", 1.0), ("s14", 1.5)):
        hand_made_trial(trial, noisem=noisem, epochs=3 if trial == "s12" else 4)  # s13, s14 trained one epoch more
    statement, readme = bundle_of("s13", "--chosen_from", "s12", "s13", "s14")  # s13's epoch 2 released
    by_hand = RDPAccountant()
    # every run at its last checkpoint, s13 too: it may have been picked for its epoch 3
    by_hand.history = [(1.0, 0.02, 200), (1.0, 0.02, 150), (1.5, 0.02, 200)]
    composed = by_hand.get_epsilon(delta=1 / 400, alphas=config.DP_ORDERS)
    single = privacy.epsilon_from_history([(1.0, 0.02, 150)], 1 / 400)
    assert statement["epsilon"] == pytest.approx(composed, rel=1e-9) and composed > 1.4 * single
    pick = statement["selection_among_runs"]
    assert [r["trial"] for r in pick["runs"]] == ["s13", "s12", "s14"]
    assert pick["epsilon_single_run"] == pytest.approx(single) and pick["composition"].startswith("sequential")
    assert f"({composed:.3g}, {1 / 400:.3g})-differentially private" in readme
    assert "chosen among 3 runs" in readme and f"alone would have epsilon {single:.3g}" in readme
    info = json.loads(synthetic_path("s13", 2, 0.8).with_suffix(".json").read_text())
    assert info["epsilon_valid"] == pytest.approx(composed) and info["chosen_from"] == ["s13", "s12", "s14"]
    assert info["epsilon_valid_single_run"] == pytest.approx(single)


def test_a_full_disk_under_the_release_keeps_the_old_set_and_bundle_together(private_run, copy_shared, capsys,
                                                                               monkeypatch):
    import errno

    from utils import common

    copy_shared(private_run.root)
    folder = release_dir(private_run.epoch_2.name)
    bundles = sorted(p.name for p in folder.parent.iterdir())
    set_path = synthetic_path("p", 2, 0.8)
    before = {p: p.read_bytes() for p in (set_path, set_path.with_suffix(".json"), *folder.iterdir())}
    original = common.save_json

    def full_under_release(path, obj):
        if "release" in str(path):
            raise common.write_failure(path, OSError(errno.ENOSPC, "No space left on device"))
        return original(path, obj)

    monkeypatch.setattr(release, "save_json", full_under_release)
    with pytest.raises(SystemExit):
        generate_samples.main(["--trial", "p", "--epoch", "2", "--n_samples", "4", "--overwrite"])
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(error) == 1 and "privacy.json: no space left on the disk" in error[0]
    assert {p: p.read_bytes() for p in before} == before  # neither the set nor the bundle was replaced
    assert sorted(p.name for p in folder.parent.iterdir()) == bundles  # no staging folder left
    assert not list(set_path.parent.glob(".*"))


def test_a_set_another_live_run_is_writing_is_refused(private_run, copy_shared, capsys):
    from utils.locks import lock_path

    copy_shared(private_run.root)
    lock = lock_path(synthetic_path("p", 0, 0.8))  # beside the trial's other sets
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "now"}))
    with pytest.raises(SystemExit):
        generate_samples.main(["--trial", "p", "--epoch", "0", "--n_samples", "4"])
    assert "synthetic set DP_p_0_0.8 is in use by process" in capsys.readouterr().err
    assert not synthetic_path("p", 0, 0.8).exists() and not release_dir("DP_p_0_0.8").exists()
