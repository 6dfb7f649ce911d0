"""The release bundle (utils/release.py) written by generate_samples.py after real tiny GAN runs."""

import json

import pytest
import torch

import generate_samples
import run_gan
from utils import release
from utils.common import PipelineError, gan_results_dir, synthetic_name
from utils.gan import build_generator, checkpoint_path, read_log
from utils.privacy import PRV_EPS_ERROR
from utils.release import PAPER_COUNT_KEY, RELEASE_FILES, release_dir
from utils.synthesis import BEST_EPOCH

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing", "ignore:Secure RNG turned off")
torch.set_num_threads(1)


@pytest.fixture
def work(dirs):
    from tests.test_gan import write_patches

    write_patches()
    return dirs[1]


def release_after_training(trial, *flags, epoch=BEST_EPOCH):
    run_gan.main(["--trial", trial, "--epochs", "3", *flags])
    generate_samples.main(["--trial", trial, "--epoch", str(epoch), "--n_samples", "6"])
    return release_dir(synthetic_name(trial, epoch, 0.8)), read_log(gan_results_dir(trial) / "log.csv")


def test_private_run_epoch_9999_releases_four_files_with_the_last_epochs_valid_epsilon(work):
    folder, log = release_after_training("p", "--noisem", "1.0")
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
    readme = (folder / "README.txt").read_text()
    assert "ONE training patch" in readme and "does NOT cover" in readme and "seeded generator" in readme


def test_non_private_and_paper_mode_statements(work):
    folder, _ = release_after_training("np", "--noisem", "inf", epoch=2)
    statement = json.loads((folder / "privacy.json").read_text())
    assert statement["epsilon"] == "inf" and statement["guarantee"].startswith("none")
    assert "NO differential privacy guarantee" in (folder / "README.txt").read_text()

    folder, log = release_after_training("pp", "--noisem", "2", "--dp_mode", "paper", epoch=2)
    statement = json.loads((folder / "privacy.json").read_text())
    assert statement["epsilon"] == pytest.approx(log[-1]["epsilon_valid"])
    assert statement[PAPER_COUNT_KEY] == pytest.approx(log[-1]["epsilon"])


def test_secure_rng_is_recorded_nowhere_and_draws_other_noise(work):
    folder, _ = release_after_training("s1", "--noisem", "1.0", "--secure_rng", epoch=2)
    assert json.loads((folder / "privacy.json").read_text())["seeded"] is False
    assert "operating system's entropy" in (folder / "README.txt").read_text()
    release_after_training("s2", "--noisem", "1.0", "--secure_rng", epoch=2)
    released = [torch.load(release_dir(synthetic_name(t, 2, 0.8)) / "generator.pt", weights_only=True)
                for t in ("s1", "s2")]
    # Same --seed (same initialisation and fake draws), other noise and batches: other generators.
    assert any(not torch.equal(a, b) for a, b in zip(*(r["state_dict"].values() for r in released)))


def test_existing_bundle_is_refused_before_anything_is_written(work, capsys):
    folder, _ = release_after_training("p", "--noisem", "1.0", epoch=2)
    before = (folder / "privacy.json").read_bytes()
    (folder.parent.parent / "synthetic" / f"gen_patches_{folder.name}.npz").unlink()
    with pytest.raises(SystemExit):
        generate_samples.main(["--trial", "p", "--epoch", "2", "--n_samples", "6"])
    assert "exists already" in capsys.readouterr().err and (folder / "privacy.json").read_bytes() == before
    generate_samples.main(["--trial", "p", "--epoch", "2", "--n_samples", "4", "--overwrite"])
    assert json.loads((folder / "privacy.json").read_text())["n_synthetic_pairs"] == 4


def test_missing_accountant_checkpoint_is_a_clear_error(work):
    run_gan.main(["--trial", "p", "--epochs", "2", "--noisem", "1.0"])
    checkpoint_path("p", 1).unlink()
    with pytest.raises(PipelineError, match="epoch_1.pth"):
        release.trial_privacy("p", {"args": {"noisem": 1.0}}, 1)


def test_a_warm_started_run_names_its_public_checkpoint_and_the_assumption_its_epsilon_rests_on(work, monkeypatch):
    from tests.test_gan import train_public
    from utils.common import file_sha256

    public = train_public(monkeypatch, work)
    folder, log = release_after_training("warm", "--noisem", "1.0", "--init_from", str(public))
    statement = json.loads((folder / "privacy.json").read_text())
    assert statement["initialised_from"]["sha256"] == file_sha256(public)
    assert "public data" in statement["initialised_from"]["assumption"]
    assert statement["epsilon"] == pytest.approx(log[-1]["epsilon_valid"], rel=1e-9)
    assert f"Warm start: {release.PUBLIC_INIT_ASSUMPTION}" in (folder / "README.txt").read_text()
    cold, _ = release_after_training("cold", "--noisem", "1.0")
    assert "initialised_from" not in json.loads((cold / "privacy.json").read_text())
