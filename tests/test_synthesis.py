"""utils/synthesis.py and generate_samples.py on a hand-made tiny GAN trial (tiny generator, config.json, log.csv)."""

import csv
import functools
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import config
import generate_samples
from model import Generator
from utils import privacy
from utils.common import PipelineError, gan_model_dir, gan_results_dir, patches_path, save_npz, synthetic_path
from utils.gan_log import LOG_COLUMNS
from utils.synthesis import select_epoch, to_pairs

TRIAL = "T1"
MODEL_ARGS = dict(ngf=4, kg=4, strg=2, padg=1, opg=0, latent_dim=16, upsampling=False, ndf=2, kd=4, strd=2)
LOSS_G = [-9.0, 3.0, 0.5, 0.2, 0.9]  # epoch 0 is the global minimum, epoch 3 the minimum after skipping 1
N_TRAIN, SAMPLE_RATE, STEPS_PER_EPOCH = 12, 0.25, 10


def accountant_state(epoch, noisem):
    """The accountant dict of run_gan.py's checkpoint after `epoch` (strict: STEPS_PER_EPOCH steps an epoch)."""
    history = [] if math.isinf(noisem) else [(noisem, SAMPLE_RATE, STEPS_PER_EPOCH * (epoch + 1))]
    return {"history": history, "generator_updates": 5 * (epoch + 1), "sample_rate": SAMPLE_RATE,
            "delta": 1 / N_TRAIN, "dp_mode": "strict"}


@functools.cache  # each make_trial writes five epochs' epsilons: a fraction of a second each to compute
def epsilon_after(epoch, noisem=1.0, accountant="rdp"):
    return privacy.epsilon_from_history(accountant_state(epoch, noisem)["history"], 1 / N_TRAIN, accountant)


def label_layers(generator):
    """(the GroupNorm feeding the last transposed convolution, that convolution)."""
    return generator.body[-4], generator.body[-2]


def make_trial(work, label_weight=None, epochs=(0, 1, 2, 3, 4), noisem=1.0, trial=TRIAL):
    """Write a GAN trial: checkpoints epoch_<e>.pth for `epochs`, config.json and log.csv of 5 epochs.

    label_weight=None keeps the random generator; a number forces the label channel: the last GroupNorm
    outputs 1 everywhere and every label-channel weight of the last layer is label_weight, so the raw label
    output is tanh(label_weight x (number of taps >= 2)) at every pixel (0 for label_weight 0)."""
    torch.manual_seed(0)
    generator = Generator(**{k: MODEL_ARGS[k] for k in ("ngf", "kg", "strg", "padg", "opg", "latent_dim",
                                                        "upsampling")})
    if label_weight is not None:
        norm, last = label_layers(generator)
        with torch.no_grad():
            norm.weight.zero_()
            norm.bias.fill_(1.0)
            last.weight[:, 1] = label_weight
    models = gan_model_dir(trial)
    models.mkdir(parents=True, exist_ok=True)
    for epoch in epochs:
        torch.save({"epoch": epoch, "generator": generator.state_dict(), "model_args": MODEL_ARGS,
                    "accountant": accountant_state(epoch, noisem), "rng": torch.get_rng_state()},
                   models / f"epoch_{epoch}.pth")
    results = gan_results_dir(trial)
    results.mkdir(parents=True, exist_ok=True)
    args = {"trial": trial, "noisem": noisem, "dp_mode": "strict", "max_norm_dp": 1.0, "n_discr": 2}
    (results / "config.json").write_text(json.dumps({"args": args, "n_samples": N_TRAIN, "delta": 1 / N_TRAIN,
                                                     "skull_stripped": True, "patches_per_patient_max": 6}))
    with open(results / "log.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(LOG_COLUMNS)
        for epoch, loss_g in enumerate(LOSS_G):
            eps = "inf" if math.isinf(noisem) else epsilon_after(epoch, noisem)
            diagnostics = [0.5, 1.0, 20.0]  # grad_norm_median, clipped_fraction, noise_to_signal
            steps = STEPS_PER_EPOCH * (epoch + 1)
            writer.writerow([epoch, 0.1, loss_g, 0.0, 0.0, 0.0, eps, eps, eps, *diagnostics, steps, steps // 2, 2, 1.0])
    return generator


def generate(*args):
    return generate_samples.main(["--trial", TRIAL, *map(str, args)])


def load_set(epoch, thresh=config.THRESH):
    path = synthetic_path(TRIAL, epoch, thresh)
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    return arrays, json.loads(path.with_suffix(".json").read_text())


def test_generated_files_have_the_documented_keys_shapes_and_ranges(dirs):
    _, work, _ = dirs
    make_trial(work)
    out = generate("--epoch", 2, "--n_samples", 20, "--device", "cpu")
    arrays, info = load_set(2)
    assert out == synthetic_path(TRIAL, 2, config.THRESH)
    assert set(arrays) == {"img", "label"}
    img, label = arrays["img"], arrays["label"]
    assert img.shape == (20, 96, 96, 1) and img.dtype == np.float32
    assert label.shape == (20, 96, 96, 1) and label.dtype == np.uint8
    np.testing.assert_allclose(img.min(axis=(1, 2, 3)), 0, atol=1e-4)
    np.testing.assert_allclose(img.max(axis=(1, 2, 3)), 255, atol=1e-3)
    assert set(np.unique(label)) <= {0, 1}
    assert {"trial", "epoch_requested", "epoch", "thresh", "n_samples", "epsilon", "epsilon_valid", "noisem",
            "dp_mode", "seed"} <= set(info)
    assert (info["trial"], info["epoch_requested"], info["epoch"], info["thresh"], info["n_samples"]) == \
        (TRIAL, 2, 2, config.THRESH, 20)
    assert (info["epsilon"], info["noisem"], info["dp_mode"]) == (epsilon_after(2), 1.0, "strict")
    assert info["seed"] == config.SYNTHESIS_SEED
    assert info["skull_stripped"] is True and info["started_from"] is None  # from its GAN's config.json; a cold start
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_same_seed_same_pairs_other_seed_other_pairs(dirs):
    _, work, _ = dirs
    make_trial(work)
    generate("--epoch", 1, "--n_samples", 5, "--seed", 3)
    first = load_set(1)[0]["img"]
    generate("--epoch", 1, "--n_samples", 5, "--seed", 3, "--overwrite")
    np.testing.assert_array_equal(load_set(1)[0]["img"], first)
    generate("--epoch", 1, "--n_samples", 5, "--seed", 4, "--overwrite")
    assert not np.allclose(load_set(1)[0]["img"], first)


def test_threshold_compares_the_raw_label_output():
    # label channel values (tanh scale): only those strictly above thresh become 1; 0.7 is above 0.8 on the
    # (x + 1) / 2 scale but not on the raw one, which is the documented rule.
    raw = torch.tensor([-0.9, 0.0, 0.7, 0.8, 0.81, 0.99])
    output = torch.stack([torch.linspace(-1, 1, 96 * 96).reshape(96, 96),
                          raw.repeat_interleave(96 * 16).reshape(96, 96)])[None]
    img, label = to_pairs(output, 0.8)
    assert label.dtype == np.uint8 and label.shape == (1, 96, 96, 1)
    np.testing.assert_array_equal(label[0, ::16, 0, 0], [0, 0, 0, 0, 1, 1])
    assert img[0].min() == 0 and img[0].max() == 255
    np.testing.assert_array_equal(to_pairs(output, 0.5)[1][0, ::16, 0, 0], [0, 0, 1, 1, 1, 1])


@pytest.mark.parametrize("label_weight, thresh, expected", [(1.0, 0.8, 1), (1.0, 0.0, 1), (0.0, 0.0, 0),
                                                            (0.0, 0.8, 0), (-1.0, 0.0, 0)])
def test_forced_label_output_is_thresholded(dirs, label_weight, thresh, expected):
    # weight 1: raw label output >= tanh(2 * ngf) > 0.96; weight 0: exactly 0 (not > 0); weight -1: < -0.96
    _, work, _ = dirs
    make_trial(work, label_weight=label_weight)
    generate("--epoch", 0, "--thresh", thresh, "--n_samples", 3)
    label = load_set(0, thresh)[0]["label"]
    assert (label == expected).all()


def test_epoch_9999_picks_min_generator_loss_and_carries_the_epsilon_of_the_last_epoch_it_looked_at(dirs):
    _, work, _ = dirs
    make_trial(work)
    generate("--epoch", 9999, "--nr_e_skipped", 1, "--n_samples", 2)
    info = load_set(9999)[1]
    assert (info["epoch_requested"], info["epoch"]) == (9999, 3)
    # The choice looked at the losses of epochs 1-4, which depend on the critic up to epoch 4: epoch 4's epsilon.
    assert info["epsilon"] == info["epsilon_valid"] == pytest.approx(epsilon_after(4))
    assert info["epsilon_valid"] > epsilon_after(3)
    assert info["epsilon_valid_prv"] == pytest.approx(epsilon_after(4, accountant="prv"))
    assert info["selection"]["epochs_seen"] == [1, 2, 3, 4] and info["selection"]["privacy_of_epoch"] == 4
    rows = [{"epoch": e, "loss_g": g} for e, g in enumerate(LOSS_G)]
    assert select_epoch(rows, 9999, 0)[0] == 0
    assert select_epoch(rows, 9999, 4)[0] == 4
    assert select_epoch(rows, 2, 4) == (2, {"rule": "epoch 2, named by the user", "epochs_seen": [],
                                            "privacy_of_epoch": 2})
    with pytest.raises(PipelineError, match="none left"):
        select_epoch(rows, 9999, 5)


def test_a_named_epoch_carries_its_own_epsilon(dirs):
    _, work, _ = dirs
    make_trial(work)
    generate("--epoch", 1, "--n_samples", 2)
    assert load_set(1)[1]["epsilon_valid"] == pytest.approx(epsilon_after(1))


def test_default_nr_e_skipped_and_n_samples(dirs, monkeypatch):
    _, work, _ = dirs
    make_trial(work)
    monkeypatch.setattr(config, "NR_E_SKIPPED", 4)
    generate("--epoch", 9999)
    arrays, info = load_set(9999)
    assert info["epoch"] == 4
    assert info["n_samples"] == 12 == len(arrays["img"])  # the trial's config.json
    save_npz(patches_path("train"), img=np.zeros((7, 96, 96), np.float32), label=np.zeros((7, 96, 96), np.uint8))
    generate("--epoch", 9999, "--overwrite")
    assert load_set(9999)[1]["n_samples"] == 12  # what the trial trained on, not today's patches file


def test_non_private_trial_writes_inf(dirs):
    _, work, _ = dirs
    make_trial(work, noisem=math.inf)
    generate("--epoch", 1, "--n_samples", 2)
    info = load_set(1)[1]
    assert info["epsilon"] == info["epsilon_valid"] == info["noisem"] == "inf"


def test_shape_flags_default_to_the_checkpoint_and_contradictions_fail(dirs, capsys):
    _, work, _ = dirs
    make_trial(work)
    generate("--epoch", 1, "--n_samples", 2, "--kg", 4, "--ngf", 4, "--no-upsampling", "--lrg", 0.1)
    for flag, value, stored in (("--kg", 5, 4), ("--ngf", 96, 4), ("--padg", 0, 1)):
        with pytest.raises(SystemExit) as exit_:
            generate("--epoch", 1, "--n_samples", 2, flag, value, "--overwrite")
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert f"{flag} {value}" in err and f"{flag[2:]}={stored}" in err
    with pytest.raises(SystemExit):
        generate("--epoch", 1, "--n_samples", 2, "--upsampling", "--overwrite")
    assert "upsampling=False" in capsys.readouterr().err


def test_missing_epoch_names_the_existing_ones_and_missing_trial_fails(dirs, capsys):
    _, work, _ = dirs
    make_trial(work, epochs=(0, 2, 4))
    with pytest.raises(SystemExit):
        generate("--epoch", 3, "--n_samples", 2)
    err = capsys.readouterr().err
    assert "epoch 3" in err and "0, 2, 4" in err
    with pytest.raises(SystemExit):  # 9999 with nr_e_skipped 1 selects epoch 3, which has no checkpoint
        generate("--epoch", 9999, "--nr_e_skipped", 1, "--n_samples", 2)
    assert "0, 2, 4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate_samples.main(["--trial", "nope", "--epoch", "1"])
    err = capsys.readouterr().err
    assert "'nope' does not exist" in err and "run_gan.py" in err
    assert not (work / "synthetic").exists()


def test_existing_output_is_refused_without_overwrite(dirs):
    _, work, env = dirs
    make_trial(work)
    generate("--epoch", 0, "--n_samples", 2)
    before = synthetic_path(TRIAL, 0, config.THRESH).read_bytes()
    # as a script: exit code 2 and one clear line
    result = subprocess.run([sys.executable, "generate_samples.py", "--trial", TRIAL, "--epoch", "0",
                             "--n_samples", "3"], env=env, capture_output=True, text=True,
                            cwd=config.__file__.rsplit("/", 1)[0])
    assert result.returncode == 2 and "exists already" in result.stderr and "--overwrite" in result.stderr
    assert synthetic_path(TRIAL, 0, config.THRESH).read_bytes() == before


def test_bad_thresh_is_refused(dirs):
    _, work, _ = dirs
    make_trial(work)
    with pytest.raises(SystemExit):
        generate("--epoch", 0, "--thresh", 1.5)
    assert not (work / "synthetic").exists()
