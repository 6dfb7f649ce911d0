import csv
import json
import math

import numpy as np
import pytest

import compare_results
from utils.common import PipelineError


def write_result(folder, name, epsilon, test_dsc, fid=None, **extra):
    result = {"training_input": name, "epsilon": epsilon, "epsilon_valid": epsilon,
              "test_dsc": {"mean": test_dsc, "sd": 0.01}, "test2_dsc": {"mean": test_dsc - 0.05, "sd": 0.02},
              "test_bahd": {"mean": 1.5, "sd": 0.1}, "test2_bahd": {"mean": None, "sd": None},
              "ssim_real": 0.3, **extra}
    if fid is None:
        result["fid"] = "not computed: the Inception weights file is missing"
    else:
        result.update(fid_train=fid, fid_test=fid + 10, fid_difference=-10.0, ssim_generated=0.4)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}_results.json").write_text(json.dumps(result))


def test_collects_every_result_into_one_csv_table_and_figure(dirs, capsys):
    _, work, _ = dirs
    results = work / "results"
    write_result(results, "real", "real data", 0.89)
    write_result(results, "DP_a_49_0.8", math.inf, 0.84, fid=62.0)
    write_result(results, "DP_b_49_0.8", 7.4, 0.75, fid=244.0, started_from="public GAN")
    write_result(results, "DP_c_49_0.8", 3.1, 0.40)
    (results / "DP_b_49_0.8_audit.json").write_text(json.dumps({"mia_auc": 0.512, "patient_auc": 0.6,
                                                                "control_auc": 0.49}))
    (results / "WGAN_a").mkdir()  # a GAN's folder is not a result
    rows = compare_results.main([])
    assert [r["training_input"] for r in rows] == ["DP_a_49_0.8", "DP_b_49_0.8", "DP_c_49_0.8", "real"]
    with open(results / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4
    b = next(r for r in table if r["training_input"] == "DP_b_49_0.8")
    assert float(b["epsilon"]) == 7.4 and float(b["test_dsc"]) == 0.75 and float(b["fid_train"]) == 244.0
    assert (float(b["mia_auc"]), float(b["control_auc"])) == (0.512, 0.49)  # read from the set's audit
    c = next(r for r in table if r["training_input"] == "DP_c_49_0.8")
    assert c["mia_auc"] == ""
    assert c["fid_train"].startswith("not computed")  # said, not replaced by a number
    assert (results / "summary_vs_epsilon.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "test DSC" in out and "0.750" in out and "inf" in out and "not computed" in out
    assert "MIA AUC" in out and "0.512" in out
    # the table says where each GAN started, so rows that differ by their start are not read as differing by privacy
    assert b["started_from"] == "public GAN" and "GAN start" in out
    assert next(line for line in out.splitlines() if line.startswith("DP_b_49_0.8")).split()[2:4] == ["public", "GAN"]


def test_no_results_is_a_clear_error(dirs):
    with pytest.raises(PipelineError, match="eval_unet.py"):
        compare_results.main.__wrapped__([])


def test_broken_result_file_is_named(dirs):
    _, work, _ = dirs
    (work / "results").mkdir(parents=True)
    (work / "results" / "x_results.json").write_text("{not json")
    with pytest.raises(PipelineError, match="x_results.json"):
        compare_results.main.__wrapped__([])


def test_seeds_are_aggregated_per_noise_multiplier_with_the_best_run_by_val_dsc(dirs, capsys):
    _, work, _ = dirs
    results = work / "results"
    for seed, dsc, val in ((1, 0.70, 0.5), (2, 0.80, 0.9), (3, 0.90, 0.1)):
        write_result(results, f"DP_noise1_seed{seed}_49_0.8", 5.0, dsc, noise_multiplier=1.0, dp_mode="strict",
                     val_dsc={"mean": val, "sd": 0.0})
    write_result(results, "DP_noiseinf_seed1_49_0.8", "inf", 0.85, noise_multiplier="inf", dp_mode="strict",
                 val_dsc={"mean": 0.8, "sd": 0.0})
    write_result(results, "real", "real data", 0.89)
    compare_results.main([])
    with open(results / "summary_by_noise.csv") as f:
        table = {row["noise_multiplier"]: row for row in csv.DictReader(f)}
    assert set(table) == {"1.0", "inf"}
    one = table["1.0"]
    assert one["runs"] == "3" and float(one["test_dsc_mean"]) == pytest.approx(0.8)
    assert float(one["test_dsc_sd"]) == pytest.approx(0.1)
    assert one["best_run"] == "DP_noise1_seed2_49_0.8"  # highest val DSC, not highest test DSC
    assert table["inf"]["epsilon_valid_mean"] == "inf"
    assert "mean (SD) over seeds per noise multiplier" in capsys.readouterr().out


def test_the_best_run_of_a_noise_carries_the_epsilon_of_every_run_it_was_chosen_from(dirs, capsys):
    """The pick by val DSC looks at all three seeds: its guarantee is Opacus's RDP accountant over their three
    histories (each set's JSON records its run's), shown beside the single run's."""
    from opacus.accountants import RDPAccountant

    import config
    from utils import privacy

    _, work, _ = dirs
    results, sets = work / "results", work / "synthetic"
    sets.mkdir(parents=True)
    histories = {1: [[1.0, 0.01, 300]], 2: [[1.0, 0.01, 200]], 3: [[1.0, 0.01, 300], [1.0, 0.005, 50]]}
    for seed, val in ((1, 0.5), (2, 0.9), (3, 0.1)):
        name = f"DP_noise1_seed{seed}_49_0.8"
        single = privacy.epsilon_from_history(histories[seed], 1e-4)
        info = {"trial": f"noise1_seed{seed}", "epoch": 49, "delta": 1e-4, "privacy_unit": "patch",
                "accountant_history": histories[seed], "epsilon_valid": single, "epsilon_valid_single_run": single}
        (sets / f"gen_patches_{name}.json").write_text(json.dumps(info))
        write_result(results, name, single, 0.8, noise_multiplier=1.0, dp_mode="strict",
                     val_dsc={"mean": val, "sd": 0.0}, training_data=str(sets / f"gen_patches_{name}.npz"))
    compare_results.main([])
    with open(results / "summary_by_noise.csv") as f:
        row = next(csv.DictReader(f))
    by_hand = RDPAccountant()
    by_hand.history = [tuple(h) for seed in (1, 2, 3) for h in histories[seed]]
    composed = by_hand.get_epsilon(delta=1e-4, alphas=config.DP_ORDERS)
    assert row["best_run"] == "DP_noise1_seed2_49_0.8" and row["best_chosen_among"] == "3"
    assert float(row["best_epsilon_valid"]) == pytest.approx(privacy.epsilon_from_history(histories[2], 1e-4))
    assert float(row["best_epsilon_of_pick"]) == pytest.approx(composed, rel=1e-9)
    assert composed > 1.4 * float(row["best_epsilon_valid"])
    out = capsys.readouterr().out
    assert "eps of the pick" in out and f"{composed:.3g}" in out


def test_results_audit_or_bundle_of_a_set_regenerated_since_are_refused_with_the_commands_to_redo(dirs):
    from utils.common import file_sha256, save_npz, synthetic_path
    from utils.release import release_dir

    _, work, _ = dirs
    results, set_path = work / "results", synthetic_path("a", 49, 0.8)
    save_npz(set_path, img=np.zeros((2, 4, 4)), label=np.zeros((2, 4, 4), np.uint8))
    set_path.with_suffix(".json").write_text(json.dumps({"trial": "a", "epoch_requested": 49, "thresh": 0.8}))
    old = file_sha256(set_path)
    release_dir("DP_a_49_0.8").mkdir(parents=True)
    (release_dir("DP_a_49_0.8") / "synthetic.npz").write_bytes(set_path.read_bytes())
    write_result(results, "DP_a_49_0.8", 5.0, 0.8, training_data=str(set_path), training_sha256=old)
    (results / "DP_a_49_0.8_audit.json").write_text(json.dumps({"mia_auc": 0.5, "synthetic": str(set_path),
                                                                "synthetic_sha256": old}))
    assert compare_results.main.__wrapped__([])[0]["training_input"] == "DP_a_49_0.8"  # all in step
    save_npz(set_path, img=np.ones((2, 4, 4)), label=np.zeros((2, 4, 4), np.uint8))  # generate_samples --overwrite
    summary = (results / "summary.csv").read_bytes()
    with pytest.raises(PipelineError) as err:
        compare_results.main.__wrapped__([])
    message = str(err.value)
    assert "DP_a_49_0.8_results.json was computed on other contents" in message
    assert "python eval_unet.py --trial a --epoch 49 --thresh 0.8 --overwrite" in message
    assert "DP_a_49_0.8_audit.json audited other contents" in message and "audit_privacy.py --trial a" in message
    assert "the release bundle" in message and "holds other pairs than the set" in message
    assert (results / "summary.csv").read_bytes() == summary  # nothing was written
