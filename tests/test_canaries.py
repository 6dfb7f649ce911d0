"""One-run canary audit (utils/canaries.py, run_gan.py --audit_canaries, audit_privacy.py --canaries): the
Steinke et al. bound, the canaries, their inclusion in training and accounting, the audit and its refusals."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import binom

import audit_privacy
import config
import generate_samples
import run_gan
from utils import canaries
from utils.audit import audit_paths
from utils.common import gan_results_dir, patches_path, save_npz, synthetic_path
from utils.gan_data import scale_pairs
from utils.privacy import steps_per_epoch
from utils.release import release_dir

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing", "ignore:Secure RNG turned off")


# ---- the bound ----
@pytest.mark.parametrize("r", [10, 50])
def test_all_guesses_right_without_delta_gives_the_hand_derived_bound(r):
    # delta 0, v = r: P[Bin(r, q) >= r] = q^r = 0.05  =>  q = 0.05^(1/r), epsilon = log(q / (1 - q))
    q = 0.05 ** (1 / r)
    assert canaries.epsilon_lower_bound(r, r, r) == pytest.approx(math.log(q / (1 - q)), abs=1e-3)


def test_p_value_with_delta_on_a_case_derived_by_hand():
    # m = r = v = 2, epsilon 0 (q = 1/2): f(2) = 1/4; max over i of P[2 - i <= Bin < 2] / i = max(1/2, 3/4 / 2)
    # = 1/2; p = 1/4 + 2 m delta / 2 = 1/4 + 2 delta
    assert canaries.p_value(0.0, 0.1, 2, 2, 2) == pytest.approx(0.25 + 0.2)
    assert canaries.p_value(0.0, 0.0, 2, 2, 2) == pytest.approx(0.25)
    assert canaries.p_value(0.0, 1.0, 2, 2, 2) == 1.0  # capped


def test_the_bound_is_zero_at_chance_and_grows_with_the_correct_guesses():
    bounds = [canaries.epsilon_lower_bound(1000, 100, v, delta=1e-4) for v in range(101)]
    assert bounds[50] == 0 and bounds[55] == 0
    assert all(a <= b for a, b in zip(bounds, bounds[1:]))
    assert bounds[100] > bounds[80] > 0
    assert canaries.epsilon_lower_bound(1000, 100, 90, delta=1e-3) < canaries.epsilon_lower_bound(1000, 100, 90)


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 3.0])
def test_an_epsilon_dp_mechanism_exceeds_its_epsilon_with_probability_at_most_five_percent(epsilon):
    # Randomised response with epsilon guesses each canary right with probability e^eps / (1 + e^eps): exactly the
    # binomial of the theorem. Sum the probability of every count of correct guesses whose bound exceeds epsilon.
    r = 200
    q = 1 / (1 + math.exp(-epsilon))
    above = [v for v in range(r + 1) if canaries.epsilon_lower_bound(r, r, v) > epsilon]
    assert above and binom.pmf(above, r, q).sum() <= 0.05


# ---- the canaries ----
def test_canaries_carry_unique_codes_in_image_and_label_and_half_are_included():
    rng = np.random.default_rng(0)
    img = rng.normal(100, 20, (500, 64, 64)).astype(np.float32)
    label = (rng.random((500, 64, 64)) < 0.05).astype(np.uint8)
    made = canaries.make_canaries(img, label, 400, np.random.default_rng(1))
    assert len(set(made["code"].tolist())) == 400 and len(set(made["base_index"].tolist())) == 400
    assert 150 < made["included"].sum() < 250
    offset, cell = canaries.code_square(64)
    assert (offset, cell) == (16, 8)
    base = made["base_index"][0]
    cells = np.kron(canaries.code_bits(made["code"][:1])[0], np.ones((cell, cell), bool))
    square = (slice(16, 48), slice(16, 48))
    assert np.array_equal(made["label"][0][square], cells)
    assert np.array_equal(made["img"][0][square], np.where(cells, img[base].max(), img[base].min()))
    outside = np.ones((64, 64), bool)
    outside[square] = False
    assert np.array_equal(made["img"][0][outside], img[base][outside])
    assert np.array_equal(made["label"][0][outside], label[base][outside])
    with pytest.raises(Exception, match="--audit_canaries 501"):
        canaries.make_canaries(img, label, 501, rng)


@pytest.mark.parametrize("epsilon, delta", [(1.0, 0.0), (2.0, 1e-4)])
def test_the_audits_largest_bound_over_every_try_exceeds_the_epsilon_of_a_dp_mechanism_at_most_5pct(epsilon, delta):
    # Randomised response on each canary's inclusion is epsilon-DP per canary; the audit tries 2 attacks x 6 guess
    # counts and keeps the largest bound: over 300 simulated runs it may exceed epsilon in at most ~5% of them.
    rng = np.random.default_rng(4)
    m, exceeded = 200, 0
    for _ in range(300):
        included = rng.random(m) < 0.5
        truthful = rng.random((2, m)) < 1 / (1 + math.exp(-epsilon))
        scores = {f"attack {a}": np.where(truthful[a], included, ~included) + 0.1 * rng.random(m) for a in (0, 1)}
        exceeded += canaries.canary_audit(scores, included, delta)["epsilon_lower_bound"] > epsilon
    assert exceeded <= 0.05 * 300 + 5  # (binomial slack) the expected count is below 15


def test_guess_counts_are_even_and_at_most_m_and_no_bound_when_2_m_delta_reaches_1():
    assert canaries.guess_counts(7) == [2, 4, 6] and canaries.guess_counts(2) == [2]
    included = np.arange(100) % 2 == 0
    result = canaries.canary_audit({"oracle": included * 1.0}, included, delta=0.005)  # 2 m delta = 1
    assert result["epsilon_lower_bound"] == 0 and "can show no bound" in result["note"]


def test_scores_that_know_the_inclusion_give_a_large_bound_and_random_ones_none():
    included = np.random.default_rng(2).random(1000) < 0.5
    perfect = canaries.canary_audit({"oracle": included * 1.0}, included, delta=1e-5)
    assert perfect["best"]["correct"] == perfect["best"]["guesses"] and perfect["epsilon_lower_bound"] > 2
    random = canaries.canary_audit({"noise": np.random.default_rng(3).random(1000)}, included, delta=1e-5)
    assert random["epsilon_lower_bound"] == 0
    assert random["tests"] == len(canaries.guess_counts(1000)) and random["per_test_alpha"] < 0.05


# ---- in training and in the audit ----
N_PATCHES = 48


def write_patches():
    """N_PATCHES noise patches of two patients, with sparse labels."""
    rng = np.random.default_rng(0)
    size = config.PATCH_SIZE
    path = patches_path("train")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_npz(path, img=rng.normal(100, 20, (N_PATCHES, size, size)).astype(np.float32),
             label=(rng.random((N_PATCHES, size, size)) < 0.05).astype(np.uint8),
             patient=np.array(["p0", "p1"] * (N_PATCHES // 2)), centre=np.zeros((N_PATCHES, 3), np.int32))


@pytest.fixture
def work(dirs):
    write_patches()
    return dirs[1]


@pytest.fixture(scope="module")
def plain_trial(shared_folder):
    """A run without canaries (non-private, one epoch), trained once; the tests that audit it copy it."""
    def build():
        write_patches()
        run_gan.main(["--trial", "plain", "--epochs", "1", "--noisem", "inf"])

    return shared_folder("plain_trial", build)[0]


def test_a_canary_run_trains_on_the_included_canaries_accounts_for_them_and_is_never_released(work, capsys):
    trial = run_gan.main(["--trial", "c", "--epochs", "1", "--noisem", "1", "--audit_canaries", "20"])
    made = canaries.load_canaries(canaries.canaries_path(gan_results_dir("c")))
    included = made["included"]
    n = N_PATCHES + int(included.sum())
    assert 0 < included.sum() < 20 and trial.n_samples == n == len(trial.data)
    # the accounting counts all 20 canaries, drawn in or not: q, the steps and delta do not reveal the draw
    assert trial.delta == pytest.approx(1 / (N_PATCHES + 20))
    assert trial.sample_rate == pytest.approx(config.BATCH_SIZE / (N_PATCHES + 20))
    assert trial.updates_per_epoch == steps_per_epoch(N_PATCHES + 20, config.BATCH_SIZE)
    # what the accountant counted: one step per critic iteration, each at that rate and the run's noise
    history = trial.engine.accountant.history
    assert all(h[0] == 1.0 and h[1] == pytest.approx(config.BATCH_SIZE / (N_PATCHES + 20)) for h in history)
    assert sum(h[2] for h in history) == trial.updates_per_epoch * config.N_DISCR
    # the Poisson sampler draws over the pairs trained on (canaries included) at that same rate
    batches = [next(trial.indices) for _ in range(400)]
    assert max(max(b) for b in batches if len(b)) == n - 1
    assert np.mean([len(b) for b in batches]) == pytest.approx(n * config.BATCH_SIZE / (N_PATCHES + 20), abs=0.5)
    assert torch.equal(trial.data[N_PATCHES:], scale_pairs(made["img"][included], made["label"][included]))
    assert json.loads((gan_results_dir("c") / "config.json").read_text())["n_samples"] == n

    resumed = run_gan.main(["--trial", "c", "--epochs", "2", "--noisem", "1", "--audit_canaries", "20", "--resume"])
    assert torch.equal(resumed.data, trial.data)  # the same canaries, read back

    generate_samples.main(["--trial", "c", "--epoch", "1", "--n_samples", "30"])
    assert synthetic_path("c", 1, config.THRESH).is_file() and not release_dir("DP_c_1_0.8").exists()
    assert "no release bundle" in capsys.readouterr().out

    result = audit_privacy.main(["--canaries", "--trial", "c", "--epoch", "1", "--device", "cpu"])
    saved = json.loads(audit_paths("WGAN_c_1_canary")[0].read_text())
    assert saved["epsilon_lower_bound"] == result["epsilon_lower_bound"] <= saved["epsilon_theoretical"]
    assert saved["epsilon_theoretical"] == pytest.approx(resumed.guarantee()["epsilon_valid"], rel=1e-6)
    assert set(saved["attacks"]) == {"critic score (white box; internal)", "nearest synthetic pair (black box)"}
    assert saved["verdict"].startswith("consistent")
    with pytest.raises(SystemExit):  # one audit per draw: another epoch would be a second look
        audit_privacy.main(["--canaries", "--trial", "c", "--epoch", "0", "--device", "cpu"])
    assert "was audited already" in capsys.readouterr().err
    again = audit_privacy.main(["--canaries", "--trial", "c", "--epoch", "1", "--device", "cpu", "--overwrite"])
    assert again["epsilon_lower_bound"] == result["epsilon_lower_bound"]


def test_a_synthetic_set_that_copies_the_included_canaries_is_caught(work, monkeypatch):
    # delta 1/N = 1/69 would make the theorem's 2 m delta term exceed 1: no bound could be shown (utils/canaries.py)
    monkeypatch.setattr(config, "DELTA", 1e-5)
    run_gan.main(["--trial", "m", "--epochs", "1", "--noisem", "inf", "--audit_canaries", "40"])
    made = canaries.load_canaries(canaries.canaries_path(gan_results_dir("m")))
    save_npz(synthetic_path("m", 0, config.THRESH), img=made["img"][made["included"]],
             label=made["label"][made["included"]])
    result = audit_privacy.main(["--canaries", "--trial", "m", "--epoch", "0", "--device", "cpu"])
    n_in = int(made["included"].sum())
    tries = result["attacks"]["nearest synthetic pair (black box)"]["tries"]
    assert all(t["correct"] == t["guesses"] for t in tries if t["guesses"] <= 2 * min(n_in, 40 - n_in))
    assert result["best"]["attack"] == "nearest synthetic pair (black box)"
    assert result["epsilon_lower_bound"] > 1 and result["epsilon_theoretical"] == math.inf


@pytest.mark.parametrize("argv, message", [
    (["--canaries", "--epoch", "0"], "give --trial and --epoch"),
    (["--canaries", "--trial", "plain", "--epoch", "0"], "was not trained with run_gan.py --audit_canaries"),
])
def test_the_canary_audit_refuses_bad_input_before_writing(plain_trial, copy_shared, capsys, argv, message):
    copy_shared(plain_trial)
    with pytest.raises(SystemExit):
        audit_privacy.main(argv)
    assert message in capsys.readouterr().err
    assert not audit_paths("WGAN_plain_0_canary")[0].exists()


@pytest.mark.parametrize("flags, message", [
    (["--audit_canaries", "49"], "--audit_canaries 49: must lie between 1 and 48"),
    (["--audit_canaries", "5", "--privacy_unit", "patient"], "needs --privacy_unit patch"),
])
def test_bad_canary_flags_stop_run_gan_before_anything_is_written(work, capsys, flags, message):
    with pytest.raises(SystemExit):
        run_gan.main(["--trial", "x", "--epochs", "1", *flags])
    assert message in capsys.readouterr().err
    assert not gan_results_dir("x").exists()
