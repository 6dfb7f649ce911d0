"""DP-WGAN training (run_gan.py, utils/gan.py: GanTrial): accounting, outputs, resume and its repairs, the public
start, patient-level runs, the dcgan recipe, errors. The steps themselves: tests/test_gan_steps.py."""

import csv
import json
import math
import os
import shutil
import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

import config
import run_gan
from utils import bookkeeping, gan, gan_checkpoints, gan_data, gan_log
from utils.common import gan_model_dir, gan_results_dir, patches_path
from utils.privacy import gan_privacy, steps_per_epoch

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing", "ignore:Secure RNG turned off")

N_PATCHES = 32  # tiny preset: batch 8 -> 4 generator updates per epoch, n_discr 2


def write_patches(n=N_PATCHES, seed=0, size=96, **extra):
    """A small synthetic patches file: noise images with one bright disc, labelled; extra: more arrays."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    img = rng.normal(100, 20, (n, size, size)).astype(np.float32)
    label = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        lo, hi = size * 20 // 96, size * 76 // 96
        cy, cx, r = rng.integers(lo, hi), rng.integers(lo, hi), rng.integers(size * 5 // 96, size * 15 // 96)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        label[i][disc], img[i][disc] = 1, img[i][disc] + 300
    path = patches_path("train")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, img=img, label=label, patient=np.array(["p0"] * n), centre=np.zeros((n, 3), np.int32), **extra)


@pytest.fixture
def work(dirs):
    write_patches()
    return dirs[1]


def count_dp_steps(patch):
    """Counts the DP optimizers' noisy steps (pre_step runs clipping, noise and the accountant hook), Opacus's
    per-sample one and the one for ready-clipped sums (bk, ghost), while `patch` (a MonkeyPatch) is active."""
    calls = []
    for cls in (DPOptimizer, DPOptimizerFastGradientClipping):
        def counting(self, *args, _original=cls.pre_step, **kwargs):
            calls.append(1)
            return _original(self, *args, **kwargs)
        patch.setattr(cls, "pre_step", counting)
    return calls


@pytest.fixture
def dp_steps(monkeypatch):
    return count_dp_steps(monkeypatch)


def train(*flags):
    return run_gan.main(["--trial", "t", *flags])


def log_rows(trial="t"):
    with open(gan_results_dir(trial) / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


# ---- trials that several tests read, trained once (a test that changes one works on its copy: copy_shared) ----
def trained_once(shared_folder, name, *flags):
    """Trial "t" trained with `flags` on write_patches() in a shared folder: its folder (root), the run's GanTrial
    (trial), its noisy steps (dp_steps), log.csv (log) and model folder (models)."""
    def build():
        write_patches()
        with pytest.MonkeyPatch.context() as patch:
            steps = count_dp_steps(patch)
            trial = train(*flags)
        return SimpleNamespace(trial=trial, dp_steps=len(steps), log=log_rows(), models=gan_model_dir("t"))
    root, run = shared_folder(name, build)
    run.root = root
    return run


@pytest.fixture(scope="module")
def one_epoch(shared_folder):
    """One epoch of the default run (noise 1, strict)."""
    return trained_once(shared_folder, "one_epoch", "--epochs", "1")


@pytest.fixture(scope="module")
def two_epochs(shared_folder):
    """Two epochs of the default run, uninterrupted."""
    return trained_once(shared_folder, "two_epochs", "--epochs", "2")


@pytest.fixture(scope="module")
def non_private(shared_folder):
    """One epoch without noise."""
    return trained_once(shared_folder, "non_private", "--epochs", "1", "--noisem", "inf")


def test_one_strict_epoch_writes_every_output_and_accounts_each_noisy_step(one_epoch, copy_shared):
    copy_shared(one_epoch.root)
    trial, noisy_steps = one_epoch.trial, one_epoch.dp_steps
    updates = steps_per_epoch(N_PATCHES, config.BATCH_SIZE)
    assert noisy_steps == updates * config.N_DISCR == trial.accounted_steps()

    results, models = gan_results_dir("t"), gan_model_dir("t")
    for name in ("config.json", "log.csv", "losses.png", "epsilon.png", "samples_epoch_0.png"):
        assert (results / name).is_file(), name
    rows = log_rows()
    assert list(rows[0]) == list(gan_log.LOG_COLUMNS) and len(rows) == 1
    expected = gan_privacy(1.0, 1, config.BATCH_SIZE, N_PATCHES, config.N_DISCR, "strict")
    assert float(rows[0]["epsilon"]) == pytest.approx(expected["epsilon"], rel=1e-9)
    assert float(rows[0]["epsilon_valid"]) == float(rows[0]["epsilon"])
    assert int(rows[0]["steps"]) == expected["steps"] == noisy_steps
    assert float(rows[0]["wasserstein"]) == pytest.approx(float(rows[0]["d_real"]) - float(rows[0]["d_fake"]))

    stored = json.loads((results / "config.json").read_text())
    assert {"args", "preset", "versions", "config", "n_samples", "delta"} <= set(stored)
    assert stored["n_samples"] == N_PATCHES and stored["delta"] == 1 / N_PATCHES and stored["args"]["noisem"] == 1

    checkpoint = gan_checkpoints.load_checkpoint(models / "epoch_0.pth")
    keys = {"epoch", "generator", "discriminator", "opt_g", "opt_d", "accountant", "rng", "model_args"}
    assert keys <= set(checkpoint)
    assert not any("_module" in k for k in checkpoint["discriminator"])
    g, d = gan_checkpoints.build_networks(checkpoint["model_args"])
    g.load_state_dict(checkpoint["generator"])
    d.load_state_dict(checkpoint["discriminator"])
    assert max(p.abs().max().item() for p in d.parameters()) <= config.CLIP_PARAM_W
    assert checkpoint["accountant"]["history"] == [(1.0, config.BATCH_SIZE / N_PATCHES, noisy_steps)]


def test_paper_mode_counts_two_steps_per_critic_iteration_and_reports_the_valid_epsilon(work, dp_steps):
    trial = train("--epochs", "1", "--dp_mode", "paper", "--noisem", "0.8")
    updates = steps_per_epoch(N_PATCHES, config.BATCH_SIZE)
    assert len(dp_steps) == 2 * updates * config.N_DISCR == trial.accounted_steps()
    expected = gan_privacy(0.8, 1, config.BATCH_SIZE, N_PATCHES, config.N_DISCR, "paper")
    row = log_rows()[0]
    assert float(row["epsilon"]) == pytest.approx(expected["epsilon"], rel=1e-9)
    assert float(row["epsilon_valid"]) == pytest.approx(expected["epsilon_valid"], rel=1e-9)


@pytest.mark.parametrize("dp_mode, batches_per_update", [("strict", config.N_DISCR), ("paper", 1)])
def test_strict_draws_a_batch_per_critic_iteration_and_paper_one_per_generator_update(work, monkeypatch, dp_mode,
                                                                                       batches_per_update):
    drawn = []
    real_batch = gan.GanTrial.real_batch
    monkeypatch.setattr(gan.GanTrial, "real_batch", lambda self: drawn.append(1) or real_batch(self))
    train("--epochs", "1", "--dp_mode", dp_mode, "--noisem", "inf")
    assert len(drawn) == steps_per_epoch(N_PATCHES, config.BATCH_SIZE) * batches_per_update


def test_a_run_whose_poisson_draws_are_empty_trains_and_counts_each_as_a_noisy_step(work, monkeypatch, dp_steps):
    endless = gan_data.endless
    monkeypatch.setattr(gan, "endless", lambda sampler: ([] if i % 2 else batch for i, batch in
                                                         enumerate(endless(sampler))))  # every other draw empty
    trial = train("--epochs", "1")
    assert len(dp_steps) == trial.accounted_steps() == trial.updates_per_epoch * config.N_DISCR
    assert math.isfinite(float(log_rows()[0]["loss_d"]))


def test_non_private_run_has_infinite_epsilon_and_no_noisy_steps(non_private):
    row = non_private.log[0]
    assert row["epsilon"] == row["epsilon_valid"] == "inf" and row["steps"] == "0"
    assert non_private.dp_steps == 0


def test_resume_continues_exactly_like_an_uninterrupted_run(one_epoch, two_epochs, copy_shared, capsys):
    copy_shared(one_epoch.root)
    resumed = train("--epochs", "2", "--resume")
    assert resumed.start_epoch == 1
    assert resumed.engine.accountant.history == two_epochs.trial.engine.accountant.history
    assert two_epochs.log[1]["epsilon"] == log_rows()[1]["epsilon"] and len(log_rows()) == 2
    for name in ("generator", "discriminator"):
        straight = gan_checkpoints.load_checkpoint(two_epochs.models / "epoch_1.pth")[name]
        continued = gan_checkpoints.load_checkpoint(gan_model_dir("t") / "epoch_1.pth")[name]
        # RNG states restored: the same batches and noise
        assert all(torch.equal(straight[k], continued[k]) for k in straight), name
    capsys.readouterr()
    train("--epochs", "2", "--resume")
    assert "all 2 epochs are done" in capsys.readouterr().out


ADAPTIVE = ("--loss", "ns", "--n_discr", "1", "--adaptive_critic", "0.99", "--adaptive_grace", "1")


def test_an_adaptive_n_d_moves_generator_steps_and_keeps_the_noisy_steps_and_epsilon_of_the_fixed_plan(
        work, dp_steps, monkeypatch):
    drawn, observed, generated = [], [], []
    real_batch, observe, step = gan.GanTrial.real_batch, gan.AdaptiveCriticSteps.observe, gan.generator_step
    monkeypatch.setattr(gan.GanTrial, "real_batch", lambda self: drawn.append(1) or real_batch(self))
    monkeypatch.setattr(gan.AdaptiveCriticSteps, "observe", lambda self, s: observed.append(s) or observe(self, s))
    monkeypatch.setattr(gan, "generator_step", lambda *a, **k: generated.append(step(*a, **k)) or generated[-1])
    trial = train("--epochs", "2", *ADAPTIVE)
    planned = 2 * steps_per_epoch(N_PATCHES, config.BATCH_SIZE) * 1
    assert len(dp_steps) == trial.accounted_steps() == len(drawn) == planned  # a fresh batch per noisy step
    # the schedule reads the critic's scores of the generator step's generated batch, nothing computed on real data
    assert len(observed) == len(generated) == trial.generator_updates
    assert all(o is g for o, g in zip(observed, generated))
    rows = log_rows()
    expected = gan_privacy(config.NOISE_MULTIPLIER, 2, config.BATCH_SIZE, N_PATCHES, 1)["epsilon_valid"]
    assert float(rows[1]["epsilon_valid"]) == pytest.approx(expected, rel=1e-9)
    # the critic of a tiny run never reaches 0.99 accuracy on generated samples: n_D climbs, generator steps fall
    assert int(rows[1]["n_discr"]) > 1 and trial.generator_updates == int(rows[1]["generator_updates"]) < planned


def test_an_adaptive_run_resumes_with_its_schedule(work):
    straight = train("--trial", "straight", "--epochs", "2", *ADAPTIVE)
    train("--epochs", "1", *ADAPTIVE)
    resumed = train("--epochs", "2", "--resume", *ADAPTIVE)
    assert resumed.critic_schedule.state_dict() == straight.critic_schedule.state_dict()
    assert resumed.generator_updates == straight.generator_updates
    a, b = log_rows("straight")[1], log_rows()[1]
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}


def test_a_trial_of_an_earlier_version_resumes_and_its_log_reads_back(one_epoch, copy_shared):
    copy_shared(one_epoch.root)
    config_json = gan_results_dir("t") / "config.json"
    stored = json.loads(config_json.read_text())
    for flag in gan_checkpoints.FLAGS_ADDED_LATER:
        del stored["args"][flag]
    config_json.write_text(json.dumps(stored))
    log_path = gan_results_dir("t") / "log.csv"
    rows = [{k: v for k, v in row.items() if k not in gan_log.LATER_COLUMNS} for row in log_rows()]
    with open(log_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    train("--epochs", "2", "--resume")
    old, new = gan_log.read_log(log_path)
    assert math.isnan(old["generator_updates"]) and new["generator_updates"] == 2 * steps_per_epoch(
        N_PATCHES, config.BATCH_SIZE) and new["n_discr"] == config.N_DISCR


def test_a_batch_in_physical_batches_trains_and_accounts_as_one_pass(one_epoch, work, monkeypatch):
    sizes = []
    original = bookkeeping._clip_physical_batch
    monkeypatch.setattr(bookkeeping, "_clip_physical_batch", lambda critic, batch, *a: sizes.append(len(batch))
                        or original(critic, batch, *a))
    chunked = train("--trial", "chunked", "--epochs", "1", "--max_physical_batch", "3")
    assert max(sizes) == 3 and len(sizes) > 2 * chunked.accounted_steps()  # batch 8 + 8: 6 passes a step
    assert chunked.engine.accountant.history == one_epoch.trial.engine.accountant.history  # the same run, whole
    assert json.loads((gan_results_dir("chunked") / "config.json").read_text())["args"]["max_physical_batch"] == 3


def test_a_mixed_precision_run_trains_in_float32_weights_and_accounts_as_a_float32_run(one_epoch, work,
                                                                                       monkeypatch):
    passes = []  # whether autocast was on in each private critic pass
    original = bookkeeping.clipped_gradient_sum
    monkeypatch.setattr(bookkeeping, "clipped_gradient_sum", lambda *a: passes.append(
        torch.is_autocast_enabled("cpu")) or original(*a))
    amp = train("--trial", "amp", "--epochs", "1", "--amp")
    assert passes and all(passes)
    assert amp.engine.accountant.history == one_epoch.trial.engine.accountant.history  # the same run in float32
    assert all(p.dtype == torch.float32 for p in amp.parameters())
    assert math.isfinite(float(log_rows("amp")[0]["loss_d"]))


def expect_error(capsys, *flags):
    with pytest.raises(SystemExit) as exc:
        train(*flags)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_existing_trial_is_refused_without_resume(one_epoch, copy_shared, capsys):
    copy_shared(one_epoch.root)
    config_json = gan_results_dir("t") / "config.json"
    before = config_json.read_bytes(), (gan_model_dir("t") / "epoch_0.pth").read_bytes()
    assert "exists already" in expect_error(capsys, "--epochs", "1")
    assert (config_json.read_bytes(), (gan_model_dir("t") / "epoch_0.pth").read_bytes()) == before


def test_resume_refuses_other_settings_and_missing_trials(one_epoch, copy_shared, capsys):
    copy_shared(one_epoch.root)
    assert "nothing to resume" in expect_error(capsys, "--trial", "new", "--resume")
    err = expect_error(capsys, "--resume", "--noisem", "2", "--ndf", "4")
    assert "--noisem 2.0" in err and "--ndf 4" in err


@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "33"], "larger than the 32"),
    (["--noisem", "0"], "--noisem 0.0"),
    (["--noisem", "-1"], "--noisem -1.0"),
    (["--max_norm_dp", "0"], "--max_norm_dp"),
    (["--clip_param_W", "-0.01"], "--clip_param_W"),
    (["--n_discr", "0"], "--n_discr 0"),
    (["--kg", "3"], "generator flags"),
    (["--kd", "40"], "critic flags"),
    (["--dp_mode", "loose"], "--dp_mode 'loose'"),
    (["--grad_sample_mode", "magic"], "--grad_sample_mode 'magic'"),
    (["--max_physical_batch", "0"], "--max_physical_batch 0: needs a size >= 1"),
    (["--amp", "--grad_sample_mode", "hooks"], "--amp: a private run needs --grad_sample_mode bk (not hooks)"),
    (["--max_physical_batch", "4", "--grad_sample_mode", "hooks"], "--max_physical_batch 4: needs a size >= 1, "
                                                                    "--grad_sample_mode bk"),
    (["--adaptive_critic", "0.6", "--loss", "wgan"], "it needs --loss ns or hinge, not wgan"),
    (["--adaptive_critic", "0.6", "--loss", "ns", "--n_discr", "3"], "--n_discr 3: the adaptive schedule starts on a"),
    (["--adaptive_critic", "1.5", "--loss", "ns", "--n_discr", "1"], "--adaptive_critic 1.5"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(work, capsys, flags, message):
    assert message in expect_error(capsys, *flags)
    assert not (work / "models").exists() and not (work / "results").exists()


def test_missing_patches_file_says_to_extract_patches_first(dirs, capsys):
    assert "run extract_patches.py first" in expect_error(capsys)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(one_epoch, copy_shared, capsys, monkeypatch):
    copy_shared(one_epoch.root)
    good = (gan_model_dir("t") / "epoch_0.pth").read_bytes()
    monkeypatch.setattr(gan.GanTrial, "fake_batch", lambda self: torch.full((8, 2, 96, 96), math.nan))
    err = expect_error(capsys, "--epochs", "2", "--resume")
    assert "not finite" in err and "epoch_0.pth (epoch 0)" in err
    assert (gan_model_dir("t") / "epoch_0.pth").read_bytes() == good
    assert not (gan_model_dir("t") / "epoch_1.pth").exists() and len(log_rows()) == 1


def write_patient_patches(n_patients=4, per_patient=8):
    write_patches(n_patients * per_patient)
    path = patches_path("train")
    arrays = dict(np.load(path))
    arrays["patient"] = np.repeat(np.array([f"p{i}" for i in range(n_patients)]), per_patient)
    np.savez(path, **arrays)


def test_patient_level_run_accounts_one_step_per_critic_iteration_at_rate_b_over_p(dirs, dp_steps):
    write_patient_patches()
    trial = train("--epochs", "1", "--privacy_unit", "patient", "--batch_patients", "2",
                  "--patches_per_patient_step", "3")
    updates = round(4 / 2)
    assert trial.updates_per_epoch == updates and len(dp_steps) == updates * config.N_DISCR
    assert trial.engine.accountant.history == [(1.0, 2 / 4, updates * config.N_DISCR)]
    assert trial.delta == 1 / 4 and trial.guarantee()["per_patient"]["group_size"] == 1
    stored = json.loads((gan_results_dir("t") / "config.json").read_text())
    assert (stored["privacy_unit"], stored["n_units"]) == ("patient", 4)


@pytest.mark.parametrize("flags, message", [
    (["--batch_patients", "5"], "--batch_patients 5: must lie between 1 and the 4 training patients"),
    (["--patches_per_patient_step", "9"], "--patches_per_patient_step 9: must lie between 1 and 8"),
    (["--grad_sample_mode", "ghost"], "per-sample gradients to average by patient"),
])
def test_patient_level_bad_flags_are_refused_before_anything_is_written(dirs, capsys, flags, message):
    write_patient_patches()
    with pytest.raises(SystemExit):
        train("--privacy_unit", "patient", *flags)
    assert message in capsys.readouterr().err
    assert not gan_results_dir("t").exists() and not gan_model_dir("t").exists()


def test_patient_level_needs_the_patient_array(dirs, capsys):
    write_patches()
    arrays = dict(np.load(patches_path("train")))
    del arrays["patient"]
    np.savez(patches_path("train"), **arrays)
    with pytest.raises(SystemExit):
        train("--privacy_unit", "patient")
    assert "has no `patient` array" in capsys.readouterr().err


# ---- the dcgan recipe ----
def test_dcgan_recipe_trains_resumes_and_synthesises_with_the_ema_generator(work, capsys):
    import generate_samples
    from utils.common import synthetic_path

    flags = ["--arch", "dcgan", "--ngf", "2", "--ndf", "4", "--loss", "ns", "--optimizer", "adam", "--lrd", "2e-4",
             "--lrg", "2e-4", "--ema", "0.9", "--diffaugment", "--label_scale", "pm1"]
    trial = train("--epochs", "1", *flags)
    assert trial.weight_clip is None and isinstance(trial.opt_g, torch.optim.Adam)
    assert trial.data[:, 1].unique().tolist() == [-1.0, 1.0]
    rows = log_rows()
    assert float(rows[0]["grad_norm_median"]) > 0 and 0 <= float(rows[0]["clipped_fraction"]) <= 1
    resumed = train("--epochs", "2", "--resume", *flags)
    assert resumed.accounted_steps() == 2 * trial.updates_per_epoch * config.N_DISCR
    checkpoint = gan_checkpoints.load_checkpoint(gan_checkpoints.checkpoint_path("t", 1))
    assert checkpoint["generator_ema"] is not None
    generate_samples.main(["--trial", "t", "--epoch", "1", "--n_samples", "4"])
    info = json.loads(synthetic_path("t", 1, 0.8).with_suffix(".json").read_text())
    assert "label = generator label output > 0.6 " in info["label_rule"]  # 2 x 0.8 - 1 on the -1/1 scale
    assert info["model_args"]["arch"] == "dcgan"


def test_dcgan_recipe_at_another_patch_size_trains_and_synthesises_pairs_of_that_size(dirs, monkeypatch, capsys):
    import generate_samples
    from utils.common import synthetic_path

    monkeypatch.setattr(config, "PATCH_SIZE", 48)
    write_patches(size=48)
    with pytest.raises(SystemExit):
        train("--epochs", "1")  # the paper's networks make 96 x 96 only
    assert "--arch paper" in capsys.readouterr().err and not gan_results_dir("t").exists()
    trial = train("--epochs", "1", "--arch", "dcgan", "--ngf", "2", "--ndf", "4", "--noisem", "1", "--diffaugment")
    assert trial.generator(torch.randn(3, config.LATENT_DIM)).shape == (3, 2, 48, 48)
    generate_samples.main(["--trial", "t", "--epoch", "0", "--n_samples", "5"])
    with np.load(synthetic_path("t", 0, 0.8)) as pairs:
        assert pairs["img"].shape == pairs["label"].shape == (5, 48, 48, 1)
    monkeypatch.setattr(config, "PATCH_SIZE", 64)
    write_patches(size=64)
    err = expect_error(capsys, "--epochs", "2", "--resume", "--arch", "dcgan", "--ngf", "2", "--ndf", "4", "--noisem",
                       "1", "--diffaugment")
    assert "config.PATCH_SIZE 64 (the trial has 48)" in err


def train_public(work, *flags):
    """A non-private GAN in another work folder (public data): work / "public"; returns its checkpoint of epoch 0."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(config, "WORK_DIR", work / "public")
        write_patches(seed=1)
        train("--trial", "public", "--noisem", "inf", "--epochs", "1", *flags)
        return gan_checkpoints.checkpoint_path("public", 0)


def test_init_from_starts_both_networks_from_a_public_checkpoint_and_accounts_exactly_as_a_cold_start(
        one_epoch, work, capsys):
    from utils.common import file_sha256

    public = train_public(work, "--seed", "5")
    saved = gan_checkpoints.load_checkpoint(public)
    args = run_gan.parse_args(["--trial", "warm", "--epochs", "1", "--init_from", str(public)])
    warm = gan.GanTrial(args)
    for name, net in (("generator", warm.generator), ("discriminator", warm.critic)):
        assert all(torch.equal(v, saved[name][k]) for k, v in net.state_dict().items()), name
    cold = one_epoch.trial
    assert not all(torch.equal(v, saved["generator"][k]) for k, v in cold.generator.state_dict().items())
    stored = json.loads((gan_results_dir("warm") / "config.json").read_text())
    assert stored["init_sha256"] == file_sha256(public) and stored["args"]["init_from"] == str(public)
    warm = train("--trial", "warm2", "--epochs", "1", "--init_from", str(public))
    # The public start changes where training begins, not what is sampled, clipped, noised or counted.
    assert warm.engine.accountant.history == cold.engine.accountant.history
    assert log_rows("warm2")[0]["epsilon_valid"] == one_epoch.log[0]["epsilon_valid"]
    public.unlink()  # resuming reads the trial's own checkpoint, not the public one
    resumed = train("--trial", "warm2", "--epochs", "2", "--resume", "--init_from", str(public))
    assert resumed.start_epoch == 1


@pytest.fixture(scope="module")
def public_ndf2(shared_folder):
    """A public start with a narrower critic than this module's runs (ndf 2), trained once."""
    return shared_folder("public_ndf2", lambda: train_public(config.WORK_DIR, "--ndf", "2"))[1]


@pytest.mark.parametrize("flags, message", [
    (["--init_from", "nowhere.pth"], "--init_from nowhere.pth: no such checkpoint"),
    (["--ndf", "4"], "its networks differ from this run's: ndf 2 (this run: 4)"),
])
def test_init_from_a_missing_or_different_checkpoint_is_refused_before_anything_is_written(public_ndf2, work, capsys,
                                                                                             flags, message):
    err = expect_error(capsys, "--init_from", str(public_ndf2), *flags)
    assert message in err
    assert not gan_results_dir("t").exists() and not gan_model_dir("t").exists()


def test_init_from_a_gan_trained_on_the_same_patients_is_refused(non_private, copy_shared, capsys):
    copy_shared(non_private.root)  # a non-private GAN of this work folder's patches
    err = expect_error(capsys, "--trial", "new", "--init_from", str(gan_checkpoints.checkpoint_path("t", 0)))
    assert "trained on this work folder's patches" in err and not gan_results_dir("new").exists()


def test_init_from_a_gan_of_another_folder_trained_on_the_same_patches_is_refused(non_private, work, capsys):
    # the shared run's work folder is another one, with a copy of these very patches (write_patches())
    err = expect_error(capsys, "--init_from", str(non_private.models / "epoch_0.pth"))
    assert "trained on the same patches file as this run" in err and not gan_results_dir("t").exists()


def test_a_run_records_its_patches_preparation_and_refuses_a_public_start_prepared_otherwise(dirs, capsys):
    work = dirs[1]
    public = train_public(work)  # its patches file records nothing: cut from raw scans
    assert json.loads((work / "public" / "results" / "WGAN_public" / "config.json").read_text())[
        "skull_stripped"] is False
    write_patches(skull_stripped=np.array(True))
    err = expect_error(capsys, "--init_from", str(public))
    assert "trained on raw (not skull-stripped) patches, this run's are skull-stripped" in err
    assert not gan_results_dir("t").exists()
    train("--epochs", "1", "--noisem", "inf")
    assert json.loads((gan_results_dir("t") / "config.json").read_text())["skull_stripped"] is True


def test_init_from_starts_the_generator_and_its_average_from_the_public_average(work):
    public = train_public(work, "--ema", "0.9")
    saved = gan_checkpoints.load_checkpoint(public)
    warm = gan.GanTrial(run_gan.parse_args(["--trial", "warm", "--epochs", "1", "--ema", "0.9",
                                            "--init_from", str(public)]))
    for net in (warm.generator, warm.generator_ema):
        assert all(torch.equal(v, saved["generator_ema"][k]) for k, v in net.state_dict().items())
    assert not all(torch.equal(v, saved["generator"][k]) for k, v in warm.generator.state_dict().items())


# ---- a trial owned by one run; an epoch committed as one unit; a stopped run repaired ----
def test_a_trial_another_live_run_owns_is_refused_and_nothing_is_written(work, capsys):
    from utils.locks import lock_path

    lock = lock_path(gan_results_dir("t"))
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "now"}))
    assert f"GAN trial 't' is in use by process {os.getppid()}" in expect_error(capsys, "--epochs", "1")
    assert not gan_model_dir("t").exists() and not gan_results_dir("t").exists() and lock.exists()


def stop_at_checkpoint(monkeypatch, epoch):
    """Stop the run (as a kill would) when it is about to write the checkpoint of `epoch`."""
    def save(path, obj):
        if obj["epoch"] == epoch:
            raise KeyboardInterrupt("killed")
        return original(path, obj)
    original = gan.save_torch
    monkeypatch.setattr(gan, "save_torch", save)
    return original


def test_a_run_stopped_before_its_checkpoint_resumes_to_the_log_of_an_uninterrupted_run(one_epoch, two_epochs,
                                                                                         copy_shared, monkeypatch,
                                                                                         capsys):
    copy_shared(one_epoch.root)
    original = stop_at_checkpoint(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        train("--epochs", "2", "--resume")
    monkeypatch.setattr(gan, "save_torch", original)
    # the epoch's log row was written, not its checkpoint
    assert len(log_rows()) == 2 and gan_checkpoints.checkpoint_epochs("t") == [0]
    (gan_model_dir("t") / ".epoch_1.pth.k2j_x9a0.pth").write_bytes(b"half a checkpoint")  # killed in torch.save
    resumed = train("--epochs", "2", "--resume")
    out = capsys.readouterr().out
    assert "removed .epoch_1.pth.k2j_x9a0.pth" in out and "epoch 1 of trial 't' was left half-done" in out
    assert resumed.start_epoch == 1 and sorted(p.name for p in gan_model_dir("t").iterdir()) == ["epoch_0.pth",
                                                                                                  "epoch_1.pth"]
    drop = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in log_rows()] == \
        [{k: v for k, v in r.items() if k not in drop} for r in two_epochs.log]
    assert resumed.engine.accountant.history == two_epochs.trial.engine.accountant.history


def test_a_checkpoint_without_its_log_row_is_removed_and_its_epoch_trained_again(two_epochs, copy_shared, capsys):
    copy_shared(two_epochs.root)
    rows = log_rows()
    log_path = gan_results_dir("t") / "log.csv"
    gan_log.write_log(log_path, gan_log.read_log(log_path)[:1])  # old order
    train("--epochs", "2", "--resume")
    assert "epoch 1 was left half-done (its checkpoint has no row in log.csv" in capsys.readouterr().out
    assert [r["epsilon"] for r in log_rows()] == [r["epsilon"] for r in rows]  # epoch 1 has its row again
    # not kept beside its replay: the same noise draws in two models would leak what the accountant does not count
    assert sorted(p.name for p in gan_model_dir("t").iterdir()) == ["epoch_0.pth", "epoch_1.pth"]


@pytest.mark.parametrize("resume", [[], ["--resume"]])
def test_a_trial_stopped_in_epoch_0_starts_again_with_or_without_resume(work, monkeypatch, capsys, resume):
    original = stop_at_checkpoint(monkeypatch, 0)
    with pytest.raises(KeyboardInterrupt):
        train("--epochs", "1")
    monkeypatch.setattr(gan, "save_torch", original)
    assert (gan_results_dir("t") / "config.json").is_file() and gan_checkpoints.checkpoint_epochs("t") == []
    trial = train("--epochs", "1", *resume)
    assert "it starts again from epoch 0" in capsys.readouterr().out
    assert trial.start_epoch == 0 and gan_checkpoints.checkpoint_epochs("t") == [0] and len(log_rows()) == 1


def test_resume_refuses_a_changed_patches_file_and_a_folder_without_room_before_training(one_epoch, copy_shared,
                                                                                          capsys, monkeypatch):
    copy_shared(one_epoch.root)
    original = patches_path("train").read_bytes()
    write_patches(seed=1)  # re-extracted: as many patches, other contents
    err = expect_error(capsys, "--epochs", "2", "--resume")
    assert "the patches file" in err and "has changed since the trial started" in err
    patches_path("train").write_bytes(original)
    monkeypatch.setattr(run_gan, "generator_update", lambda *a: pytest.fail("trained before checking the folders"))
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: shutil._ntuple_diskusage(1, 1, 0))
    err = expect_error(capsys, "--epochs", "2", "--resume")
    assert "the checkpoints need about" in err and str(gan_model_dir("t")) in err
    assert gan_checkpoints.checkpoint_epochs("t") == [0] and len(log_rows()) == 1
