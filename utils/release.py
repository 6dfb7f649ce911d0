"""The release bundle: exactly what may leave the hospital, and a statement of its guarantee (SPEC "What may be
released").

WORK_DIR/release/<set name>/ holds four files and nothing else:
- synthetic.npz: the synthetic image and label arrays (as the synthetic set);
- generator.pt: the generator's state_dict and model_args (plain tensors: loads with weights_only=True);
- privacy.json: the (epsilon, delta) guarantee and how it was accounted;
- README.txt: the same in plain words.
Only functions of the DP outputs go in. The critic, the optimizers, the seeds and RNG states, the log (losses,
critic scores and Wasserstein estimates on training patches) and every evaluation against training patches stay
internal: they are computed on the training patches without noise and are not covered by epsilon.
"""

import math
import shutil
import tempfile
from pathlib import Path

import config
from utils import privacy
from utils.common import PipelineError, refuse_existing, save_json, save_npz, save_torch, versions
from utils.gan import GENERATOR_ARGS, checkpoint_path, describe_group_privacy, load_checkpoint

RELEASE_FILES = ("synthetic.npz", "generator.pt", "privacy.json", "README.txt")
PAPER_COUNT_KEY = "epsilon_paper_count_NOT_a_valid_bound"


def release_dir(set_name):
    return config.WORK_DIR / "release" / set_name


def json_number(value):
    """Infinity (a non-private run) as the string "inf", which every JSON reader accepts."""
    return "inf" if isinstance(value, float) and math.isinf(value) else value


def trial_privacy(trial, trial_config, epoch):
    """The guarantee that holds for anything chosen by looking at the trial's values up to `epoch`, from the
    accountant state in that epoch's checkpoint, recomputed with Opacus's RDP and PRV accountants.

    Returns a dict with epsilon (as the run counted it: for paper mode the paper's number, not a valid bound),
    epsilon_valid (RDP), epsilon_valid_prv, delta, sample_rate, steps (of the valid history) and the run's
    settings."""
    path = checkpoint_path(trial, epoch)
    if not path.is_file():
        raise PipelineError(f"GAN trial {trial!r}: the checkpoint {path} holds the accountant of epoch {epoch}, "
                            f"whose epsilon the chosen generator carries, and it does not exist")
    accountant = load_checkpoint(path)["accountant"]
    args = trial_config.get("args", {})
    noisem, dp_mode = float(args.get("noisem", math.inf)), accountant["dp_mode"]
    delta, rate = accountant["delta"], accountant["sample_rate"]
    out = {"dp_mode": dp_mode, "noise_multiplier": noisem, "max_norm_dp": args.get("max_norm_dp"),
           "sample_rate": rate, "delta": delta, "n_samples": trial_config.get("n_samples"),
           "generator_updates": accountant["generator_updates"], "seeded": trial_config.get("seeded", True),
           "patches_per_patient_max": trial_config.get("patches_per_patient_max", config.PATCHES_PER_PATIENT),
           "privacy_unit": trial_config.get("privacy_unit", "patch"),
           "n_units": trial_config.get("n_units", trial_config.get("n_samples")),
           "audit_canaries": args.get("audit_canaries", 0), "init_sha256": trial_config.get("init_sha256")}
    if math.isinf(noisem):
        return {**out, "epsilon": math.inf, "epsilon_valid": math.inf, "epsilon_valid_prv": math.inf, "steps": 0}
    counted = [tuple(h) for h in accountant["history"]]
    valid = counted if dp_mode == "strict" else privacy.valid_paper_history(
        noisem, rate, accountant["generator_updates"], args["n_discr"])
    return {**out, "epsilon": privacy.epsilon_from_history(counted, delta),
            "epsilon_valid": privacy.epsilon_from_history(valid, delta),
            "epsilon_valid_prv": privacy.epsilon_from_history(valid, delta, "prv"),
            "steps": sum(h[2] for h in valid)}


def canary_refusal(trial, trial_config):
    """Why a trial's data may not be released, or None: a canary run (run_gan.py --audit_canaries) trained on
    patches made for the audit, and which of them it trained on is the audit's secret."""
    m = trial_config.get("args", {}).get("audit_canaries", 0)
    if not m:
        return None
    return (f"no release bundle: trial {trial!r} was trained with {m} audit canaries (run_gan.py --audit_canaries), "
            f"so its training set is not the patients' data; its synthetic set serves audit_privacy.py --canaries "
            f"only. Train without --audit_canaries for data to release.")


PUBLIC_INIT_ASSUMPTION = ("the generator and critic started from a checkpoint trained on public data (run_gan.py "
                          "--init_from); epsilon covers this run's training data only and holds only if no patient of "
                          "this run contributed to that checkpoint's data and neither the checkpoint nor its choice "
                          "depended on this run's data; the public data get no protection (the generator may "
                          "reproduce public images)")


def privacy_statement(trial_privacy_, n_pairs, epochs_trained, epoch_released, selection):
    """privacy.json of a release bundle (never for a canary run)."""
    p = trial_privacy_
    if p.get("audit_canaries"):
        raise PipelineError(f"a canary run ({p['audit_canaries']} audit canaries) has no release bundle: its data "
                            f"serve the privacy audit only")
    private = not math.isinf(p["epsilon_valid"])
    patient_level = p["privacy_unit"] == "patient"
    group = privacy.group_privacy(p["epsilon_valid"], p["delta"], 1 if patient_level else p["patches_per_patient_max"])
    statement = {
        "privacy_unit": p["privacy_unit"],
        "epsilon": json_number(p["epsilon_valid"]),
        "delta": p["delta"],
        "accountant": "rdp (opacus.accountants.RDPAccountant, the paper's orders)",
        "epsilon_prv": json_number(p["epsilon_valid_prv"]),
        "accountant_prv": f"prv (opacus.accountants.PRVAccountant, upper estimate, eps_error "
                          f"{privacy.PRV_EPS_ERROR}): the same history, accounted more tightly",
        "dp_mode": p["dp_mode"], "noise_multiplier": json_number(p["noise_multiplier"]),
        "max_norm_dp": p["max_norm_dp"], "sample_rate": p["sample_rate"], "steps": p["steps"],
        "n_samples": p["n_samples"], "n_privacy_units": p["n_units"],
        "per_patient": {**{k: json_number(v) for k, v in group.items()}, "statement": describe_group_privacy(group)},
        "epochs_trained": epochs_trained, "epoch_released": epoch_released, "selection": selection,
        "n_synthetic_pairs": n_pairs, "seeded": p["seeded"],
        "versions": {k: v for k, v in versions().items() if k in ("torch", "opacus")},
    }
    if p["init_sha256"]:
        statement["initialised_from"] = {"sha256": p["init_sha256"], "assumption": PUBLIC_INIT_ASSUMPTION}
    if not private:
        statement["guarantee"] = "none: this set comes from a non-private GAN (no clipping, no noise)"
    if p["dp_mode"] == "paper" and private:
        statement[PAPER_COUNT_KEY] = p["epsilon"]
    return statement


def readme_text(set_name, statement, trial):
    s = statement
    patient_level = s["privacy_unit"] == "patient"
    unit = ("ONE training patient (all of his patches)" if patient_level else
            "ONE training patch (a 96 x 96 axial slice patch)")
    if s["epsilon"] == "inf":
        guarantee = ("This set has NO differential privacy guarantee: its generator was trained without clipping "
                     "or noise. Do not share it outside the institution that holds the training scans.")
    else:
        guarantee = (f"The generator and the synthetic pairs are ({s['epsilon']:.3g}, {s['delta']:.3g})-"
                     f"differentially private with respect to {unit}: adding or removing any single "
                     f"{s['privacy_unit']} changes the probability of any output by at most a "
                     f"factor exp({s['epsilon']:.3g}), except with probability {s['delta']:.3g}. Accounted by "
                     f"Opacus's RDP accountant; its PRV accountant gives {s['epsilon_prv']:.3g} for the same run.")
    seeded = ("The DP noise and the batch sampling were drawn from a generator seeded from the operating system's "
              "entropy (run_gan.py --secure_rng).") if not s["seeded"] else (
        "WARNING: the DP noise and batch sampling came from a seeded generator (a research run). Whoever knows the "
        "seed and the other training patches could replay training; release data from a --secure_rng run.")
    not_covered = ("Several patients together: for a group of g patients, epsilon grows about g-fold." if patient_level
                   else f"A patient. Each patient contributed up to {s['per_patient']['group_size']} patches; group "
                        f"privacy turns the\n    per-patch guarantee into: {s['per_patient']['statement']}.")
    warm_start = (f"\n  Warm start: {PUBLIC_INIT_ASSUMPTION} (checkpoint sha256 {s['initialised_from']['sha256']})."
                  if "initialised_from" in s else "")
    guarantee += warm_start
    return f"""Synthetic TOF-MRA image-label pairs: {set_name}

What is here (and nothing else):
  synthetic.npz   {s['n_synthetic_pairs']} pairs: img (N x 96 x 96 x 1, float32, 0-255), label (N x 96 x 96 x 1, uint8)
  generator.pt    the generator's weights (state_dict) and model_args; load with torch.load(..., weights_only=True)
  privacy.json    the guarantee below, machine-readable

What the guarantee covers:
  {guarantee}

What it does NOT cover:
  - {not_covered}
  - Anything outside this folder: the GAN's critic, its training log (losses and critic scores on the training
    patches), checkpoints, seeds, and any metric computed against the training patches (FID to train, SSIM of
    real patches, t-SNE) were computed without noise and must not be shared.

How it was made:
  DP-WGAN trial {trial!r} (Kossen et al. 2022, with valid accounting), dp_mode {s['dp_mode']}, noise multiplier
  {s['noise_multiplier']}, clipping norm {s['max_norm_dp']}, Poisson sampling rate {s['sample_rate']:.4g} over
  {s['n_samples']} training patches, {s['steps']} accounted steps, {s['epochs_trained']} epochs trained; generator
  of epoch {s['epoch_released']} ({s['selection']['rule']}); the epsilon is that of epoch
  {s['selection']['privacy_of_epoch']}, the last epoch whose logged values the choice looked at.
  delta = 1 / number of training patches, the paper's choice; the usual advice is a delta well below 1 / N.
  {seeded}
"""


def write_release(set_name, img, label, generator, model_args, statement, trial, overwrite=False):
    """Write release_dir(set_name) with exactly RELEASE_FILES; an existing bundle needs overwrite=True and is
    replaced only once the new one is complete."""
    out = release_dir(set_name)
    if not overwrite:
        refuse_existing(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{set_name}."))
    try:
        save_npz(staging / "synthetic.npz", img=img, label=label)
        save_torch(staging / "generator.pt", {"state_dict": {k: v.detach().cpu() for k, v in
                                                             generator.state_dict().items()},
                                              "model_args": {k: model_args[k] for k in GENERATOR_ARGS
                                                             if k in model_args}})
        save_json(staging / "privacy.json", statement)
        (staging / "README.txt").write_text(readme_text(set_name, statement, trial))
        staging.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out
