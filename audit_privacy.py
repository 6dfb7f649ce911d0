"""Step 6: empirical privacy audit of a synthetic set by membership inference
(docs/audit.md).

    python audit_privacy.py --trial GAN1 --epoch 49 --thresh 0.8     # a set of generate_samples.py
    python audit_privacy.py --synthetic other_sets/pairs.npz          # any npz with `img` and `label`
    python audit_privacy.py --canaries --trial CANARY1 --epoch 3      # a run_gan.py --audit_canaries run

Members: the training patients; non-members: the held-out patients (val, test; extracted if their patches files
are missing); as many patches of each. The verdict is a permutation test over which patients are members
(patient-level AUC, p-value; "too few patients to tell" when no assignment could reach p <= 0.05). Writes
work/results/<set name>_audit.json (the test, and descriptive figures: patch-level AUC with a patient-level
bootstrap interval, TPR at 1% and 0.1% FPR, control AUC, the critic's white-box AUC when the trial's critic
exists) and <set name>_audit_roc.png, and prints the figures. See utils/audit.py for the attack and docs/audit.md
for what the figures do and do not prove. --canaries turns a canary run's guesses into an epsilon lower bound
(WGAN_<trial>_<epoch>_canary_audit.json; utils/canaries.py).
"""

import argparse
import json
from pathlib import Path

from utils.audit import audit_canary_run, audit_synthetic_set
from utils.common import add_device_arg, add_synthetic_set_args, print_setup, script_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_synthetic_set_args(p)
    p.add_argument("--synthetic", type=Path, default=None, help="audit this npz (arrays img and label) instead")
    p.add_argument("--canaries", action="store_true",
                   help="one-run audit of a canary run (run_gan.py --audit_canaries): an epsilon lower bound")
    add_device_arg(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing audit of the same set")
    return p.parse_args(argv)


@script_main
def main(argv=None):
    print_setup("audit_privacy")
    args = parse_args(argv)
    result, path = (audit_canary_run if args.canaries else audit_synthetic_set)(args)
    shown = {k: v for k, v in result.items() if k not in ("member_patients", "non_member_patients", "attacks")}
    print(f"\n{path}:\n{json.dumps(shown, indent=2)}")
    return result


if __name__ == "__main__":
    main()
