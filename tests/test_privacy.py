import json
import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as opacus_rdp

import config
from model import Discriminator
from utils import privacy

PAPER = dict(epochs=29, batch_size=32, n_samples=41_000, n_discr=5)


def opacus_epsilon(sigma, q, steps, delta):
    rdp = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=config.DP_ORDERS)
    return opacus_rdp.get_privacy_spent(orders=config.DP_ORDERS, rdp=rdp, delta=delta)[0]


def test_paper_mode_reproduces_the_papers_epsilon_and_the_valid_one():
    result = privacy.gan_privacy(0.65, dp_mode="paper", **PAPER)
    assert result["epsilon"] == pytest.approx(7.43, abs=0.01)  # the paper's number
    assert result["epsilon_valid"] == pytest.approx(82, abs=1)  # SPEC: "about 82"
    assert result["steps"] == 2 * 5 * 29 * round(41_000 / 32)
    assert result["delta"] == pytest.approx(1 / 41_000)


def test_strict_mode_equals_opacus_rdp_of_every_critic_step():
    result = privacy.gan_privacy(0.65, dp_mode="strict", **PAPER)
    steps = 29 * round(41_000 / 32) * 5
    assert result["steps"] == steps
    assert result["epsilon"] == result["epsilon_valid"]
    assert result["epsilon"] == pytest.approx(opacus_epsilon(0.65, 32 / 41_000, steps, 1 / 41_000), rel=1e-12)


def test_epsilon_from_history_matches_opacus_accountant_stepped_by_hand():
    accountant = RDPAccountant()
    for _ in range(300):
        accountant.step(noise_multiplier=1.1, sample_rate=0.01)
    for _ in range(200):
        accountant.step(noise_multiplier=0.9, sample_rate=0.02)
    expected = accountant.get_epsilon(delta=1e-5, alphas=config.DP_ORDERS)
    assert privacy.epsilon_from_history(accountant.history, 1e-5) == pytest.approx(expected, rel=1e-12)


def test_valid_paper_bound_is_one_gaussian_of_sigma_over_sqrt_k_per_update():
    # k Gaussian releases on the same subsample compose to one with sigma / sqrt(k); the RDP of the
    # unsampled (q = 1) case must therefore equal k times that of a single release exactly.
    sigma, k = 1.3, 5
    combined = opacus_rdp.compute_rdp(q=1.0, noise_multiplier=sigma / math.sqrt(k), steps=1, orders=[2, 8, 32])
    single = opacus_rdp.compute_rdp(q=1.0, noise_multiplier=sigma, steps=k, orders=[2, 8, 32])
    assert combined == pytest.approx(single)
    assert privacy.valid_paper_history(sigma, 0.01, 100, k) == [(sigma / math.sqrt(k), 0.01, 100)]


def test_more_noise_or_fewer_epochs_means_smaller_epsilon():
    base = privacy.gan_privacy(1.0, **PAPER)["epsilon"]
    assert privacy.gan_privacy(1.5, **PAPER)["epsilon"] < base
    assert privacy.gan_privacy(1.0, **dict(PAPER, epochs=10))["epsilon"] < base


def test_infinite_noise_is_a_non_private_run():
    result = privacy.gan_privacy(math.inf, **PAPER)
    assert result["epsilon"] == math.inf and result["epsilon_valid"] == math.inf
    assert result["per_patient"]["meaningful"] is False


@pytest.mark.parametrize("mode", privacy.DP_MODES)
def test_target_epsilon_gives_a_noise_multiplier_whose_valid_epsilon_hits_it(mode):
    sigma = privacy.noise_for_target_epsilon(8.0, dp_mode=mode, **PAPER)
    achieved = privacy.gan_privacy(sigma, dp_mode=mode, **PAPER)["epsilon_valid"]
    assert 7.9 < achieved <= 8.0


def test_group_privacy_of_a_patient():
    one = privacy.group_privacy(0.01, 1e-6, 10)
    assert one["epsilon"] == pytest.approx(0.1)
    assert one["delta"] == pytest.approx(10 * math.exp(9 * 0.01) * 1e-6)
    assert one["meaningful"]
    patient = privacy.group_privacy(7.4, 1 / 41_000, 1000)
    assert patient == {"group_size": 1000, "epsilon": pytest.approx(7400), "delta": 1.0, "meaningful": False}


@pytest.mark.parametrize("kwargs, flag", [
    (dict(noisem=0), "--noisem"), (dict(noisem=-1), "--noisem"), (dict(batch_size=50_000), "--batch_size"),
    (dict(n_discr=0), "--n_discr"), (dict(dp_mode="loose"), "--dp_mode"), (dict(delta=2.0), "--delta"),
])
def test_bad_settings_name_the_flag(kwargs, flag):
    settings = dict(PAPER, noisem=1.0, dp_mode="strict", delta=None)
    settings.update(kwargs)
    with pytest.raises(ValueError, match=flag):
        privacy.gan_privacy(**settings)


def test_command_line_prints_one_json_object(capsys):
    privacy.main(["--noisem", "0.65", "--epochs", "29", "--batch_size", "32", "--n_samples", "41000",
                  "--n_discr", "5", "--dp_mode", "paper"])
    out = json.loads(capsys.readouterr().out)
    assert {"epsilon", "epsilon_valid", "steps", "sample_rate", "delta"} <= set(out)
    assert out["epsilon"] == pytest.approx(7.43, abs=0.01)


def test_command_line_target_epsilon(capsys):
    privacy.main(["--target_epsilon", "5", "--epochs", "2", "--batch_size", "32", "--n_samples", "2000",
                  "--n_discr", "5"])
    out = json.loads(capsys.readouterr().out)
    assert out["target_epsilon"] == 5 and 4.9 < out["epsilon_valid"] <= 5


def test_prv_is_opacus_prv_of_the_same_history_and_tighter_than_rdp():
    history = [(0.65, 32 / 41_000, 29 * round(41_000 / 32) * 5)]
    accountant = PRVAccountant()
    accountant.history = list(history)
    expected = accountant.get_epsilon(delta=1 / 41_000, eps_error=privacy.PRV_EPS_ERROR)
    assert privacy.epsilon_from_history(history, 1 / 41_000, "prv") == pytest.approx(expected, rel=1e-9)
    result = privacy.gan_privacy(0.65, dp_mode="strict", **PAPER)
    assert result["epsilon_valid_prv"] == pytest.approx(4.60, abs=0.02)
    assert result["epsilon_valid_prv"] < result["epsilon_valid"]
    with pytest.raises(ValueError, match="--accountant"):
        privacy.epsilon_from_history(history, 1e-5, "gdp")


def test_command_line_target_epsilon_with_prv(capsys):
    privacy.main(["--target_epsilon", "5", "--epochs", "2", "--batch_size", "32", "--n_samples", "2000",
                  "--n_discr", "5", "--accountant", "prv"])
    out = json.loads(capsys.readouterr().out)
    assert out["target_accountant"] == "prv" and 4.9 < out["epsilon_valid_prv"] <= 5.01
    assert out["epsilon_valid"] > out["epsilon_valid_prv"]  # the same noise by RDP: a larger epsilon


def test_command_line_rejects_bad_noise(capsys):
    with pytest.raises(SystemExit):
        privacy.main(["--noisem", "0", "--n_samples", "100", "--batch_size", "10"])
    assert "--noisem" in capsys.readouterr().err


def test_patient_level_calculator_accounts_at_the_patient_sampling_rate(capsys):
    privacy.main(["--noisem", "1.0", "--privacy_unit", "patient", "--n_patients", "41", "--batch_patients", "10",
                  "--epochs", "10", "--n_discr", "5"])
    out = json.loads(capsys.readouterr().out)
    steps = 10 * round(41 / 10) * 5  # an epoch: round(P / b) generator updates of n_discr critic iterations
    assert (out["privacy_unit"], out["n_patients"], out["batch_patients"], out["steps"]) == ("patient", 41, 10, steps)
    assert out["epsilon_valid"] == pytest.approx(opacus_epsilon(1.0, 10 / 41, steps, 1 / 41), rel=1e-12)
    assert out["per_patient"]["group_size"] == 1 and out["per_patient"]["epsilon"] == out["epsilon_valid"]
    privacy.main(["--target_epsilon", "10", "--privacy_unit", "patient", "--n_patients", "200", "--batch_patients",
                  "50", "--epochs", "5"])
    out = json.loads(capsys.readouterr().out)
    assert 9.9 < out["epsilon_valid"] <= 10


def test_patient_level_calculator_refuses_more_patients_per_batch_than_patients(capsys):
    with pytest.raises(SystemExit):
        privacy.main(["--noisem", "1", "--privacy_unit", "patient", "--n_patients", "4", "--batch_patients", "5"])
    assert "--batch_patients 5" in capsys.readouterr().err


def test_noise_to_signal_is_sigma_sqrt_d_over_b():
    assert privacy.noise_to_signal(0.5, 10_000, 25) == pytest.approx(0.5 * 100 / 25)
    assert privacy.critic_parameters(16) == sum(p.numel() for p in Discriminator(16).parameters()) > 100_000


PAPER_SCALE = ["--n_samples", "41000", "--batch_size", "32", "--n_discr", "5"]


@pytest.mark.parametrize("flags", [["--target_epsilon", "1000", "--epochs", "50"],
                                   ["--epochs", "10000", "--noisem", "1"], ["--epochs", "100000", "--noisem", "1"]])
def test_the_calculator_answers_huge_inputs_in_seconds_with_rdp_and_says_why_prv_is_not_computed(flags):
    import time

    start = time.time()
    result = privacy.main([*flags, *PAPER_SCALE])
    assert time.time() - start < 30
    assert math.isfinite(result["epsilon_valid"]) and result["epsilon_valid_prv"] is None
    assert "not computed: Opacus's PRV accountant would discretise this history on" in result["epsilon_valid_prv_note"]


def test_a_prv_search_out_of_reach_is_refused_naming_the_flags(capsys):
    with pytest.raises(SystemExit):
        privacy.main(["--target_epsilon", "1000", "--epochs", "50", "--accountant", "prv", *PAPER_SCALE])
    assert "--accountant prv --target_epsilon 1000.0: Opacus's PRV accountant" in capsys.readouterr().err


def test_prv_is_still_computed_for_a_paper_scale_run():
    history = [(0.65, 32 / 41_000, 64_050 * 5)]
    assert privacy.prv_out_of_reach(history, 1 / 41_000) is None  # 4.5 million points: seconds


def test_a_runs_record_always_has_its_prv_epsilon_and_only_plans_skip_it(monkeypatch):
    """The trial's log, the release and a pick compute the PRV epsilon whatever the grid; the calculator alone skips
    a grid out of reach and says why."""
    history = [(1.0, 0.01, 500)]
    monkeypatch.setattr(privacy, "PRV_MAX_POINTS", 10)  # every grid is "out of reach"
    recorded = privacy.guarantee(history, 1e-5, prv=True)
    assert recorded["epsilon_valid_prv"] == pytest.approx(privacy.epsilon_from_history(history, 1e-5, "prv"))
    planned = privacy.guarantee(history, 1e-5, prv="in_reach")
    assert planned["epsilon_valid_prv"] is None and "not computed" in planned["epsilon_valid_prv_note"]
    assert planned["epsilon_valid"] == recorded["epsilon_valid"]


def test_paper_modes_valid_bound_needs_the_runs_critic_iterations():
    counted = privacy.paper_reported_history(1.0, 0.01, 100, 5)
    with pytest.raises(ValueError, match="n_discr"):
        privacy.guarantee(counted, 1e-5, "paper", 1.0, 0.01, 100)
    valid = privacy.guarantee(counted, 1e-5, "paper", 1.0, 0.01, 100, n_discr=5, prv=False)
    assert valid["history"] == [[1.0 / 5 ** 0.5, 0.01, 100]] and valid["steps_counted"] == 1000
    assert valid["epsilon_valid"] > valid["epsilon"]  # the paper's count understates the loop's privacy loss
