"""The whole experiment on the tiny preset, as a user runs it: every script in order, from the phantoms' training
patches (make_phantoms.py, extract_patches.py --split train: made once, tests/conftest.py) to the result table."""

import json
import math

import audit_privacy
import compare_results
import eval_unet
import generate_samples
import run_gan
import run_unet
from utils.common import result_paths


def test_patches_to_result_files_and_comparison(phantom_dirs, capsys):
    epoch = "1"  # tiny preset: 2 GAN epochs, zero-based
    synthetic = ["--trial", "T", "--epoch", epoch, "--thresh", "0.8"]
    run_gan.main(["--trial", "T", "--noisem", "1.5"])
    generate_samples.main(synthetic)
    audit_privacy.main(synthetic)
    for select in (synthetic, ["--real"]):
        run_unet.main(select)
        eval_unet.main(select)
    rows = compare_results.main([])

    private = json.loads(result_paths("DP_T_1_0.8")[1].read_text())
    real = json.loads(result_paths("real")[1].read_text())
    assert 0 < private["epsilon"] < math.inf and private["epsilon"] == private["epsilon_valid"]  # strict mode
    assert real["epsilon"] == "real data"
    for result in (private, real):
        for split in ("val", "test", "test2"):
            assert 0 <= result[f"{split}_dsc"]["mean"] <= 1
    assert private["fid"].startswith("not computed") or private["fid_train"] >= 0
    assert 0 < private["ssim_generated"] <= 1
    assert 0 <= private["mia_auc"] <= 1 and 0 <= private["control_auc"] <= 1  # the audit, in the result file
    assert {r["training_input"] for r in rows} == {"DP_T_1_0.8", "real"}
    assert "test DSC" in capsys.readouterr().out
