"""The release bundle: exactly what may leave the hospital, and a statement of its guarantee (docs/privacy.md, "The
release bundle: what may leave the hospital").

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
import textwrap
from pathlib import Path

import config
from utils import privacy
from utils.common import PipelineError, atomic_write, refuse_existing, save_json, save_npz, save_torch, versions
from utils.gan_checkpoints import GENERATOR_ARGS, checkpoint_path, load_checkpoint
from utils.gan_log import describe_group_privacy

RELEASE_FILES = ("synthetic.npz", "generator.pt", "privacy.json", "README.txt")
PAPER_COUNT_KEY = "epsilon_paper_count_NOT_a_valid_bound"
README_WIDTH = 116


def release_dir(set_name):
    return config.WORK_DIR / "release" / set_name


def json_number(value):
    """Infinity (a non-private run) as the string "inf", which every JSON reader accepts."""
    return "inf" if isinstance(value, float) and math.isinf(value) else value


def trial_privacy(trial, trial_config, epoch):
    """The guarantee that holds for anything chosen by looking at the trial's values up to `epoch`, from the
    accountant state in that epoch's checkpoint, recomputed with Opacus's RDP and PRV accountants.

    Returns a dict with epsilon (as the run counted it: for paper mode the paper's number, not a valid bound),
    epsilon_valid (RDP), epsilon_valid_prv, delta and how it was chosen (delta_rule), sample_rate, steps and
    history (the valid accountant history [(noise multiplier, sample rate, steps), ...], which a pick among runs
    composes) and the run's settings."""
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
           "patches_per_patient_max": recorded_patches_per_patient(trial, trial_config),
           "privacy_unit": trial_config.get("privacy_unit", "patch"),
           "n_units": trial_config.get("n_units", trial_config.get("n_samples")),
           "audit_canaries": args.get("audit_canaries", 0), "init_sha256": trial_config.get("init_sha256"),
           "trial": trial, "epoch": epoch}
    out["delta_rule"] = delta_rule(delta, out["privacy_unit"], trial_config.get("n_accounted", out["n_units"]))
    g = privacy.guarantee(None if math.isinf(noisem) else accountant["history"], delta, dp_mode, noisem, rate,
                          accountant["generator_updates"], args.get("n_discr"))
    return {**out, **{k: g[k] for k in ("epsilon", "epsilon_valid", "epsilon_valid_prv", "history")},
            "steps": g["steps_valid"]}


def recorded_patches_per_patient(trial, trial_config):
    """The most patches one patient gave the trial, as its config.json records it (trials older than that field
    record the config.PATCHES_PER_PATIENT they ran with): never today's config.py."""
    recorded = trial_config.get("patches_per_patient_max", trial_config.get("config", {}).get("PATCHES_PER_PATIENT"))
    if recorded is None:
        raise PipelineError(f"GAN trial {trial!r}: its config.json records neither patches_per_patient_max nor "
                            f"config.PATCHES_PER_PATIENT, which the per-patient statement needs")
    return int(recorded)


def unit_name(privacy_unit, count=2):
    """"patch"/"patches" or "patient"/"patients": what the sampling rate and delta count."""
    word = "patient" if privacy_unit == "patient" else "patch"
    return word if count == 1 else word + ("s" if word == "patient" else "es")


def delta_rule(delta, privacy_unit, n_accounted):
    """How the run's delta was chosen, in words: run_gan.py takes config.DELTA, or 1 / N when it is None."""
    if n_accounted and math.isclose(delta, 1 / n_accounted, rel_tol=1e-9):
        return f"1 / N with N = {n_accounted} training {unit_name(privacy_unit)} (config.DELTA unset)"
    return f"config.DELTA = {delta:g}, set for the run (1 / N would be {1 / n_accounted:.3g})" if n_accounted \
        else f"config.DELTA = {delta:g}, set for the run"


COMPOSITION = ("sequential: the runs are taken to have trained on the same patients, so each of them costs every "
               "patient privacy and their histories compose (Opacus's accountant over the concatenated histories). "
               "Runs on disjoint patients would compose in parallel (the largest of their epsilons); this is not "
               "assumed, and the sequential bound holds either way")


def runs_privacy(runs):
    """The guarantee of anything chosen by looking at the results of several runs: `runs`, trial_privacy dicts (or
    dicts with trial, epoch, history, delta, privacy_unit and epsilon_valid) of every run the choice looked at.
    Composed sequentially (COMPOSITION) at the smallest of their deltas, by Opacus's RDP and PRV accountants."""
    units = {r["privacy_unit"] for r in runs}
    if len(units) != 1:
        raise PipelineError(f"a pick among runs of different privacy units ({', '.join(sorted(units))}) has no "
                            f"single guarantee: compare runs of one unit")
    delta = min(r["delta"] for r in runs)
    non_private = any(math.isinf(float(r["epsilon_valid"])) for r in runs)
    # Each run's history is already its valid one; concatenated, they are accounted as one strict history
    composed = privacy.guarantee(None if non_private else [h for r in runs for h in r["history"]], delta)
    return {"epsilon_valid": composed["epsilon_valid"], "epsilon_valid_prv": composed["epsilon_valid_prv"],
            "delta": delta,
            "runs": [{"trial": r["trial"], "epoch": r["epoch"], "epsilon_valid": json_number(float(r["epsilon_valid"])),
                      "patches_per_patient_max": r.get("patches_per_patient_max")} for r in runs],
            "composition": COMPOSITION}


def chosen_from_privacy(trial_privacy_, chosen_from):
    """The guarantee of a run picked among the trials `chosen_from` (generate_samples.py --chosen_from; the picked
    run is added if missing): every run, the picked one included, at its last checkpoint (the most any look at its
    results can have seen: a run may have been picked for a later epoch than the one released)."""
    from utils.synthesis import available_epochs, read_trial_config

    runs = []
    for trial in dict.fromkeys([trial_privacy_["trial"], *chosen_from]):
        epochs = available_epochs(trial)
        if not epochs:
            raise PipelineError(f"--chosen_from {trial}: the trial has no checkpoint, whose accountant its epsilon "
                                f"comes from")
        runs.append(trial_privacy_ if epochs[-1] == trial_privacy_["epoch"] and trial == trial_privacy_["trial"]
                    else trial_privacy(trial, read_trial_config(trial), epochs[-1]))
    return runs_privacy(runs)


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


def privacy_statement(trial_privacy_, img, label, epochs_trained, epoch_released, selection, pick=None):
    """privacy.json of a release bundle (never for a canary run): the guarantee of the released arrays img and
    label. pick: runs_privacy() of the runs this one was chosen from (generate_samples.py --chosen_from); its
    epsilon is then the guarantee, the run's own beside it."""
    p = trial_privacy_
    if p.get("audit_canaries"):
        raise PipelineError(f"a canary run ({p['audit_canaries']} audit canaries) has no release bundle: its data "
                            f"serve the privacy audit only")
    guarantee = pick or p
    private = not math.isinf(guarantee["epsilon_valid"])
    patient_level = p["privacy_unit"] == "patient"
    most_patches = max([p["patches_per_patient_max"], *(r.get("patches_per_patient_max", 0) for r in
                                                         (pick or {}).get("runs", []))])
    group = privacy.group_privacy(guarantee["epsilon_valid"], guarantee["delta"], 1 if patient_level else most_patches)
    statement = {
        "privacy_unit": p["privacy_unit"],
        "epsilon": json_number(guarantee["epsilon_valid"]),
        "delta": guarantee["delta"],
        "delta_rule": p["delta_rule"] if pick is None or pick["delta"] == p["delta"] else
        "the smallest delta of the runs the pick was chosen from",
        "accountant": "rdp (opacus.accountants.RDPAccountant, the paper's orders)",
        "epsilon_prv": json_number(guarantee["epsilon_valid_prv"]),
        "accountant_prv": f"prv (opacus.accountants.PRVAccountant, upper estimate, eps_error "
                          f"{privacy.PRV_EPS_ERROR}): the same history, accounted more tightly",
        "dp_mode": p["dp_mode"], "noise_multiplier": json_number(p["noise_multiplier"]),
        "max_norm_dp": p["max_norm_dp"], "sample_rate": p["sample_rate"],
        "sample_rate_unit": f"Poisson-sampled {unit_name(p['privacy_unit'])} per step / training "
                            f"{unit_name(p['privacy_unit'])}",
        "steps": p["steps"], "n_samples": p["n_samples"], "n_privacy_units": p["n_units"],
        "per_patient": {**{k: json_number(v) for k, v in group.items()}, "statement": describe_group_privacy(group)},
        "epochs_trained": epochs_trained, "epoch_released": epoch_released, "selection": selection,
        "n_synthetic_pairs": len(img), "patch_size": list(img.shape[1:3]),
        "arrays": {name: {"shape": list(array.shape), "dtype": str(array.dtype)}
                   for name, array in (("img", img), ("label", label))},
        "seeded": p["seeded"],
        "versions": {k: v for k, v in versions().items() if k in ("torch", "opacus")},
    }
    if pick is not None:
        statement["selection_among_runs"] = {
            **{k: v for k, v in pick.items() if k in ("runs", "composition")},
            "rule": "chosen among these runs by looking at their results (generate_samples.py --chosen_from)",
            "epsilon_single_run": json_number(p["epsilon_valid"]),
            "epsilon_prv_single_run": json_number(p["epsilon_valid_prv"]), "delta_single_run": p["delta"],
            "note": "the single run's epsilon does not hold for a pick: the pick is a function of every run"}
    if p["init_sha256"]:
        statement["initialised_from"] = {"sha256": p["init_sha256"], "assumption": PUBLIC_INIT_ASSUMPTION}
    if not private:
        statement["guarantee"] = "none: this set comes from a non-private GAN (no clipping, no noise)"
    if p["dp_mode"] == "paper" and private:
        statement[PAPER_COUNT_KEY] = p["epsilon"]
    return statement


def paragraph(text):
    """Lines of text, each wrapped to README_WIDTH and indented by two spaces."""
    return "\n".join(textwrap.fill(line.strip(), README_WIDTH, initial_indent="  ", subsequent_indent="  ")
                     for line in text.split("\n"))


def array_text(array):
    return f"{' x '.join(map(str, array['shape']))}, {array['dtype']}"


def readme_text(set_name, statement, trial):
    """README.txt of a release bundle: every figure from `statement` (privacy.json), none from settings."""
    s = statement
    patient_level = s["privacy_unit"] == "patient"
    size = " x ".join(map(str, s["patch_size"]))
    unit = ("ONE training patient (all of his patches)" if patient_level else
            f"ONE training patch (a {size} axial slice patch)")
    if s["epsilon"] == "inf":
        guarantee = ("This set has NO differential privacy guarantee: its generator was trained without clipping "
                     "or noise. Do not share it outside the institution that holds the training scans.")
    else:
        guarantee = (f"The generator and the synthetic pairs are ({s['epsilon']:.3g}, {s['delta']:.3g})-"
                     f"differentially private with respect to {unit}: adding or removing any single "
                     f"{s['privacy_unit']} changes the probability of any output by at most a "
                     f"factor exp({s['epsilon']:.3g}), except with probability {s['delta']:.3g}. Accounted by "
                     f"Opacus's RDP accountant; its PRV accountant gives {s['epsilon_prv']:.3g} for the same "
                     f"{'runs' if 'selection_among_runs' in s else 'run'}.")
    if "selection_among_runs" in s:
        pick = s["selection_among_runs"]
        single = pick["epsilon_single_run"]
        guarantee += (f"\nThis run was chosen among {len(pick['runs'])} runs trained on the same patients "
                      f"({', '.join(r['trial'] for r in pick['runs'])}) by looking at their results, so it is a "
                      f"function of all of them: the epsilon above is theirs together, their histories composed "
                      f"(privacy.json, selection_among_runs). The chosen run alone would have epsilon "
                      f"{single if single == 'inf' else format(single, '.3g')}, which does NOT hold for this pick.")
    seeded = ("The DP noise and the batch sampling were drawn from a generator seeded from the operating system's "
              "entropy (run_gan.py --secure_rng).") if not s["seeded"] else (
        "WARNING: the DP noise and batch sampling came from a seeded generator (a research run). Whoever knows the "
        "seed and the other training patches could replay training; release data from a --secure_rng run.")
    not_covered = ("Several patients together: for a group of g patients, epsilon grows about g-fold." if patient_level
                   else f"A patient. Each patient contributed up to {s['per_patient']['group_size']} patches; group "
                        f"privacy turns the\n    per-patch guarantee into: {s['per_patient']['statement']}.")
    warm_start = (f"\nWarm start: {PUBLIC_INIT_ASSUMPTION} (checkpoint sha256 {s['initialised_from']['sha256']})."
                  if "initialised_from" in s else "")
    guarantee += warm_start
    units = unit_name(s["privacy_unit"], s["n_privacy_units"])
    sampled = (f"Poisson sampling rate {s['sample_rate']:.4g} over {s['n_privacy_units']} training {units}"
               + (f" ({s['n_samples']} patches)" if patient_level else ""))
    delta_advice = " (the paper's choice; the usual advice is a delta well below 1 / N)" \
        if s["delta_rule"].startswith("1 / N") else ""
    made = (f"DP-WGAN trial {trial!r} (Kossen et al. 2022, with valid accounting), dp_mode {s['dp_mode']}, noise "
            f"multiplier {s['noise_multiplier']}, clipping norm {s['max_norm_dp']}, {sampled}, {s['steps']} accounted "
            f"steps, {s['epochs_trained']} epochs trained; generator of epoch {s['epoch_released']} "
            f"({s['selection']['rule']}); the epsilon is that of epoch {s['selection']['privacy_of_epoch']}, the last "
            f"epoch whose logged values the choice looked at.")
    return f"""Synthetic TOF-MRA image-label pairs: {set_name}

What is here (and nothing else):
  synthetic.npz   {s['n_synthetic_pairs']} pairs: img ({array_text(s['arrays']['img'])}, 0-255), label \
({array_text(s['arrays']['label'])}, 0/1)
  generator.pt    the generator's weights (state_dict) and model_args; load with torch.load(..., weights_only=True)
  privacy.json    the guarantee below, machine-readable

What the guarantee covers:
{paragraph(guarantee)}

What it does NOT cover:
  - {not_covered}
  - Anything outside this folder: the GAN's critic, its training log (losses and critic scores on the training
    patches), checkpoints, seeds, and any metric computed against the training patches (FID to train, SSIM of
    real patches, t-SNE) were computed without noise and must not be shared.

How it was made:
{paragraph(made)}
{paragraph(f"delta = {s['delta']:.3g}: {s['delta_rule']}{delta_advice}.")}
{paragraph(seeded)}
"""


def stage_release(set_name, img, label, generator, model_args, statement, trial):
    """Write a new bundle with exactly RELEASE_FILES into a hidden staging folder beside release_dir(set_name) and
    return it; commit_release puts it in place (generate_samples.py does so together with the synthetic set)."""
    out = release_dir(set_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{set_name}."))
    try:
        save_npz(staging / "synthetic.npz", img=img, label=label)
        save_torch(staging / "generator.pt", {"state_dict": {k: v.detach().cpu() for k, v in
                                                             generator.state_dict().items()},
                                              "model_args": {k: model_args[k] for k in GENERATOR_ARGS
                                                             if k in model_args}})
        save_json(staging / "privacy.json", statement)
        atomic_write(staging / "README.txt", lambda tmp: Path(tmp).write_text(readme_text(set_name, statement, trial)))
        staging.chmod(0o755)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def commit_release(staging, set_name):
    """Replace release_dir(set_name) by the staged bundle: the old one is moved aside first and deleted last, so a
    stop in between leaves a whole bundle under one of the two names."""
    out = release_dir(set_name)
    old = out.with_name(f".{set_name}.replaced") if out.exists() else None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old)
    return out


def remove_staged_releases(set_name):
    """Delete the staging folders of set_name's bundle that a stopped run left (call it while owning the set)."""
    for leftover in release_dir(set_name).parent.glob(f".{set_name}.*"):
        if leftover.is_dir():
            shutil.rmtree(leftover)


def write_release(set_name, img, label, generator, model_args, statement, trial, overwrite=False):
    """Write release_dir(set_name) with exactly RELEASE_FILES; an existing bundle needs overwrite=True and is
    replaced only once the new one is complete."""
    if not overwrite:
        refuse_existing(release_dir(set_name))
    return commit_release(stage_release(set_name, img, label, generator, model_args, statement, trial), set_name)
