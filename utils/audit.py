"""Empirical privacy audit of a released synthetic set: membership inference (docs/audit.md).

Threat model: the attacker holds the released synthetic pairs (black box: nothing else) and a patch whose
membership in the GAN's training set he wants to decide; for the white-box attack (LOGAN, Hayes et al. 2019) he
also holds the critic, which is never released, so that figure is internal: it bounds what an insider could do.

The black-box attack is GAN-Leaks' full black-box attack (Chen et al. 2020): a query is scored by its distance
to the nearest synthetic pair, smaller = more likely a member. Distance: Euclidean, in the space of the pair
itself, image min-max scaled per patch to [0, 1] and label 0/1, both 2x2 average-pooled to 48 x 48 (a
memorised patch is close in every pixel; pooling halves the cost and forgives one-pixel shifts). It is
calibrated by a reference set (GAN-Leaks calibrates with a reference GAN, which we do not have): score =
log d(query, reference) - log d(query, synthetic), so that a patch that is close to everything (a vessel-free
background patch) does not look like a member; the ratio (rather than the difference) keeps an exact copy at the
top whatever its distance to the reference. The reference of a query is every audited patch of every OTHER
patient, member or not (adjacent patches of one patient overlap): a patient's scores then depend on the patients
and the synthetic set only, not on which patients are members, which the permutation test below needs.

Queries: the same number of patches of every audited patient, drawn at random: the training patients (members)
and the held-out patients (val and test; non-members). Patches of one patient are not independent and the
patient is the unit that was sampled into training, so the verdict rests on the patients:
- the membership test: under "no membership signal" (the synthetic set does not depend on which patients
  trained the GAN) and a split of patients into training and held-out that could have been any other, which of
  the patients are members is exchangeable. The statistic is the patient-level AUC (a patient's score = the mean
  of his patches' scores): every patient weighs the same, and a few memorised patches (large log-ratio scores)
  move their patient's mean where the patch-level AUC would dilute them among his other patches. Its p-value is
  the share of assignments of m member labels to the m + h patients whose AUC reaches the observed one: all
  C(m + h, m) of them when there are at most MAX_ENUMERATED (exact), else N_RANDOM_ASSIGNMENTS random ones (p
  = (1 + reaching) / (1 + drawn)). The verdict reads "membership leaks" only when p <= TEST_LEVEL, and "too few
  patients to tell" when even the most extreme assignment could not reach TEST_LEVEL (2 + 2 patients: 6
  assignments, p >= 1/6).
- descriptive figures: the patch-level ROC AUC and TPR at 1% and 0.1% FPR (Carlini et al. 2022: an attack that
  finds a few members with certainty matters more than the average), intervals by a patient-level (cluster)
  bootstrap: patients resampled within members and within non-members, each with all his audited patches.
- control: the same attack on the held-out patients split into two groups (alternate patients): no membership,
  but the same kind of difference between patients. Its AUC, with the same patient-level interval, says how much
  patients differ; an interval that excludes 0.5 is reported (the patch-level figures then mostly measure
  patients), and the membership test, which accounts for differences between patients, still decides.
"""

import math
from pathlib import Path

import numpy as np
import torch

import config
from utils.common import PipelineError, load_npz, minmax_scale, save_figure
from utils.data import patient_ids
from utils.membership_stats import (
    TEST_LEVEL,
    cluster_auc_ci,
    membership_test,
    patient_groups,
    patient_level,
    roc_curve,
    summarise_attack,
)

# The figures a result file and the comparison table show, with their labels.
AUDIT_FIGURES = {
    "mia_auc": "membership inference AUC per patch (descriptive; black box, calibrated nearest neighbour)",
    "mia_auc_ci95": "membership inference AUC per patch, 95% patient-level bootstrap interval",
    "mia_tpr_at_1pct_fpr": "membership inference TPR at 1% FPR (descriptive)",
    "mia_tpr_at_0.1pct_fpr": "membership inference TPR at 0.1% FPR (descriptive)",
    "patient_auc": "membership inference AUC per patient (the membership test's statistic)",
    "membership_p_value": "membership test p-value (permutation over which patients are members)",
    "control_auc": "membership inference control AUC (held-out patients vs held-out patients; no membership)",
    "critic_auc": "membership inference AUC with the critic (white box; internal)",
    "verdict": "membership inference verdict",
}
HELD_OUT_SPLITS = ("val", "test")  # non-members and the control; test2 is another protocol
POOL = 2  # average pooling of the features
DISTANCE_CHUNK = 512  # queries per distance computation
DISTANCE_FLOOR = 1e-3  # added before the log: an exact copy (distance 0) scores high, not infinite


# ---- features and distances ----
def features(img, label):
    """N x P x P (or x 1) image and label arrays -> float32 N x D: image min-max to [0, 1], label 0/1, pooled."""
    img, label = np.asarray(img), np.asarray(label)
    img = img[..., 0] if img.ndim == 4 else img
    label = label[..., 0] if label.ndim == 4 else label
    pair = torch.from_numpy(np.stack([minmax_scale(img, 0, 1), label.astype(np.float32)], axis=1))
    return torch.nn.functional.avg_pool2d(pair, POOL).flatten(1)


def nearest_distances(queries, pool, allowed=None):
    """Distance of each query (Q x D) to its nearest row of pool (P x D); allowed: Q x P bool mask or None."""
    out = torch.empty(len(queries))
    for start in range(0, len(queries), DISTANCE_CHUNK):
        d = torch.cdist(queries[start:start + DISTANCE_CHUNK], pool)
        if allowed is not None:
            d = d.masked_fill(~torch.as_tensor(allowed[start:start + DISTANCE_CHUNK]), math.inf)
        out[start:start + len(d)] = d.min(dim=1).values
    return out.numpy()


def attack_scores(queries, patients, synthetic):
    """Calibrated black-box scores (larger = more likely a member) of the queries; the reference of each is every
    query of the other patients, so that no score depends on which patients are members."""
    to_synthetic = nearest_distances(queries, synthetic)
    to_reference = nearest_distances(queries, queries, patients[:, None] != patients[None, :])
    return np.log(to_reference + DISTANCE_FLOOR) - np.log(to_synthetic + DISTANCE_FLOOR)


# ---- the audit ----
def draw_per_patient(patients, k, rng):
    """Indices of k patches of every patient (sorted ids), drawn without replacement."""
    return np.concatenate([np.sort(rng.choice(np.flatnonzero(patients == p), size=k, replace=False))
                           for p in np.unique(patients)])


def membership_audit(synthetic, members, held_out, seed=None, critic_score=None):
    """Run every attack. synthetic, members, held_out: dicts with img and label arrays (members and held_out also
    `patient`). critic_score: optional function (img, label) -> critic scores for the white-box attack.

    Returns the audit dict (figures and the numbers of queries) and the curves for the ROC figure."""
    seed = config.EVAL_SEED if seed is None else seed
    rng = np.random.default_rng([seed, 11])
    member_patients, held_patients = np.asarray(members["patient"]), np.asarray(held_out["patient"])
    member_ids, held_ids = np.unique(member_patients), np.unique(held_patients)
    if len(held_ids) < 2:
        raise PipelineError(f"the audit's control needs at least 2 held-out patients (val and test), found "
                            f"{len(held_ids)}")
    both = set(member_ids) & set(held_ids)
    if both:
        raise PipelineError(f"patients {sorted(both)} are both training and held-out patients: the audit needs "
                            f"disjoint ones")
    # The same number of patches of every patient, at most AUDIT_MAX_QUERIES members and as many non-members.
    counts = [np.sum(member_patients == p) for p in member_ids] + [np.sum(held_patients == p) for p in held_ids]
    k = max(1, min(min(counts), config.AUDIT_MAX_QUERIES // max(len(member_ids), len(held_ids))))
    member_index, non_index = draw_per_patient(member_patients, k, rng), draw_per_patient(held_patients, k, rng)
    queries = torch.cat([features(members["img"][member_index], members["label"][member_index]),
                         features(held_out["img"][non_index], held_out["label"][non_index])])
    query_patients = np.concatenate([member_patients[member_index], held_patients[non_index]])
    is_member = np.arange(len(query_patients)) < len(member_index)
    scores = attack_scores(queries, query_patients, features(synthetic["img"], synthetic["label"]))
    member_groups, _ = patient_groups(scores[is_member], query_patients[is_member])
    non_groups, _ = patient_groups(scores[~is_member], query_patients[~is_member])

    test = membership_test(patient_level(member_groups), patient_level(non_groups), seed)
    patient_value, patient_ci = cluster_auc_ci(member_groups, non_groups, patient_level, seed + 2)
    black_box = summarise_attack(member_groups, non_groups, seed)
    control = summarise_attack(non_groups[::2], non_groups[1::2], seed + 1)  # alternate held-out patients
    result = {
        "attack": "GAN-Leaks full black-box (nearest synthetic pair, pixel space of image and label, 2x2 pooled), "
                  "calibrated by the audited patches of the other patients",
        "n_members": int(len(member_index)), "n_non_members": int(len(non_index)), "patches_per_patient": int(k),
        "n_synthetic": int(len(synthetic["img"])),
        "member_patients": member_ids.tolist(), "non_member_patients": held_ids.tolist(),
        "membership_test": test, "membership_p_value": test["p_value"],
        "mia_auc": black_box["auc"], "mia_auc_ci95": black_box["auc_ci95"],
        "mia_tpr_at_1pct_fpr": black_box["tpr_at_1pct_fpr"], "mia_tpr_at_0.1pct_fpr": black_box["tpr_at_0.1pct_fpr"],
        "patient_auc": patient_value, "patient_auc_ci95": patient_ci,
        "descriptive": "mia_auc, its interval and the TPRs describe patches, which are not independent within a "
                       "patient: the membership test decides",
        "control_auc": control["auc"], "control_auc_ci95": control["auc_ci95"],
        "control_ok": None if control["auc_ci95"] is None else
        control["auc_ci95"][0] <= 0.5 <= control["auc_ci95"][1],
    }
    held_scores = scores[~is_member]
    halves = np.isin(query_patients[~is_member], held_ids[::2])
    curves = {"black box (calibrated nearest neighbour)": roc_curve(scores[is_member], held_scores),
              "control (held-out patients vs held-out patients)": roc_curve(held_scores[halves],
                                                                             held_scores[~halves])}
    if critic_score is not None:
        member_critic = critic_score(members["img"][member_index], members["label"][member_index])
        non_critic = critic_score(held_out["img"][non_index], held_out["label"][non_index])
        white_box = summarise_attack(patient_groups(member_critic, member_patients[member_index])[0],
                                     patient_groups(non_critic, held_patients[non_index])[0], seed + 3)
        result.update(critic_auc=white_box["auc"], critic_auc_ci95=white_box["auc_ci95"],
                      critic_tpr_at_1pct_fpr=white_box["tpr_at_1pct_fpr"])
        curves["white box (critic score; internal)"] = roc_curve(member_critic, non_critic)
    else:
        result["critic_auc"] = "not computed: the trial's critic is not available"
    result["verdict"] = verdict(result)
    return result, curves


def interval(ci):
    return "no interval: one patient a side" if ci is None else f"patient-level CI {ci[0]:.3f}-{ci[1]:.3f}"


def verdict(result):
    """"membership leaks" only when the membership test rejects at TEST_LEVEL; "too few patients to tell" when it
    cannot; else "no membership signal". A failed control is reported, not decisive (the test accounts for
    differences between patients)."""
    test = result["membership_test"]
    m, h, p = test["n_member_patients"], test["n_non_member_patients"], test["p_value"]
    figures = (f"patient-level AUC {result['patient_auc']:.3f}; patch-level AUC {result['mia_auc']:.3f}, "
               f"{interval(result['mia_auc_ci95'])}, descriptive")
    if test["smallest_attainable_p"] > TEST_LEVEL:
        text = (f"too few patients to tell: with {m} training and {h} held-out patients there are "
                f"{test['assignments']} ways to choose the members, so the smallest attainable p-value is "
                f"{test['smallest_attainable_p']:.3g} > {TEST_LEVEL:g}; this audit claims nothing either way "
                f"({figures})")
    elif p <= TEST_LEVEL:
        text = (f"membership leaks: the training patients score higher than chance assignments of patients allow "
                f"(permutation test p = {p:.3g} <= {TEST_LEVEL:g}; {figures})")
    else:
        text = (f"no membership signal detected by this attack (permutation test p = {p:.3g} > {TEST_LEVEL:g}; "
                f"{figures}); this is no proof of privacy: a stronger attack may succeed, the DP bound is the "
                f"guarantee")
    if result["control_ok"] is False:
        text += (f". Control: two groups of held-out patients score AUC {result['control_auc']:.3f} "
                 f"({interval(result['control_auc_ci95'])}, excludes 0.5): these patients differ, so the "
                 f"patch-level figures mostly measure patients, not membership")
    return text


def roc_figure(path, curves, title):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    floor = 1e-4
    for name, (fpr, tpr) in curves.items():
        ax.plot(np.maximum(fpr, floor), np.maximum(tpr, floor), label=name)
    ax.plot([floor, 1], [floor, 1], "k--", lw=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(path, fig)


def load_pairs(path, what, need_patients=False):
    """img and label (and patient) of an npz, checked: N x 96 x 96 (or x 1), equal N, N >= 1."""
    keys = ("img", "label", "patient") if need_patients else ("img", "label")
    data = load_npz(path, keys, what)
    img, label = data["img"], data["label"]
    shape = (config.PATCH_SIZE, config.PATCH_SIZE)
    for name, array in (("img", img), ("label", label)):
        core = array.shape[1:3] if array.ndim == 4 and array.shape[-1] == 1 else array.shape[1:]
        if array.ndim not in (3, 4) or tuple(core) != shape:
            raise PipelineError(f"{what} {path}: `{name}` has shape {array.shape}, expected N x {shape[0]} x "
                                f"{shape[1]} (or N x {shape[0]} x {shape[1]} x 1)")
    if len(img) != len(label) or len(img) == 0:
        raise PipelineError(f"{what} {path}: {len(img)} images and {len(label)} labels (need equal, at least 1)")
    return {k: data[k] for k in keys}


# ---- audit_privacy.py ----
def audit_paths(set_name, results_folder=None):
    """(audit JSON, ROC figure) of a set, in the results folder (default WORK_DIR/results)."""
    stem = Path(results_folder or config.WORK_DIR / "results") / f"{set_name}_audit"
    return stem.with_name(stem.name + ".json"), stem.with_name(stem.name + "_roc.png")


def held_out_patches():
    """The val and test patches together (extracted like extract_patches.py if their files are missing)."""
    from utils.patches import ensure_patches

    parts = []
    for split in HELD_OUT_SPLITS:
        if not patient_ids(split):
            continue
        parts.append(load_pairs(ensure_patches(split), f"{split} patches", need_patients=True))
    if not parts:
        raise PipelineError(f"the audit needs held-out patients: none in {' or '.join(HELD_OUT_SPLITS)} "
                            f"(config.PATIENT_IDS lists none there)")
    return {k: np.concatenate([p[k] for p in parts]) for k in ("img", "label", "patient")}


def critic_scorer(trial, epoch, device):
    """critic(img, label) -> scores of the trial's critic at `epoch`, or None when its checkpoint is missing.
    Internal: the critic is never released."""
    from utils.gan_checkpoints import build_networks, checkpoint_path, load_checkpoint
    from utils.gan_data import scale_pairs

    path = checkpoint_path(trial, epoch)
    if trial is None or not path.is_file():
        return None
    checkpoint = load_checkpoint(path)
    critic = build_networks(checkpoint["model_args"])[1]
    critic.load_state_dict(checkpoint["discriminator"])
    critic.to(device).eval()
    label_scale = checkpoint["model_args"].get("label_scale", "01")  # the critic saw labels on this scale

    def score(img, label):
        img = img[..., 0] if img.ndim == 4 else img
        label = label[..., 0] if label.ndim == 4 else label
        pairs = scale_pairs(img, label.astype(np.float32), label_scale)  # the critic's input, as in training
        with torch.no_grad():
            return np.concatenate([critic(pairs[i:i + 256].to(device)).cpu().numpy()
                                   for i in range(0, len(pairs), 256)])

    return score


def audit_synthetic_set(args):
    """audit_privacy.py: every check first, then the attacks, the JSON and the ROC figure."""
    from utils.common import (
        file_sha256,
        load_json,
        patches_path,
        refuse_existing,
        resolve_device,
        save_json,
        synthetic_name,
        synthetic_path,
    )
    from utils.data import check_preparation, stripped_of
    from utils.patches import recorded_preparation

    if (args.synthetic is None) == (args.trial is None):
        raise PipelineError("give either --trial (with --epoch and --thresh) or --synthetic PATH, not both or neither")
    if args.synthetic is not None:
        path = args.synthetic
        set_name = path.stem.removeprefix("gen_patches_")
    else:
        if args.epoch is None:
            raise PipelineError("--trial needs --epoch (the synthetic set's epoch as given to generate_samples.py)")
        path, set_name = synthetic_path(args.trial, args.epoch, args.thresh), synthetic_name(args.trial, args.epoch,
                                                                                             args.thresh)
    json_path, roc_path = audit_paths(set_name)
    if not args.overwrite:
        refuse_existing(json_path)
        refuse_existing(roc_path)
    digest = file_sha256(path) if path.is_file() else None  # before reading: compare_results.py checks the set
    synthetic = load_pairs(path, "synthetic set")            # against it (a set regenerated since is not this one)
    # members and non-members must be prepared alike (held_out_patches checks its own files): patches that differ
    # by skull stripping would read as membership, or hide it
    train_path = patches_path("train")
    if train_path.is_file():
        check_preparation(recorded_preparation(train_path), f"training patches {train_path}",
                          "python extract_patches.py --split train --overwrite")
    members = load_pairs(train_path, "training patches", need_patients=True)
    held_out = held_out_patches()
    info_path = path.with_suffix(".json")
    info = load_json(info_path, "synthetic set information") if info_path.is_file() else {}
    if info:
        check_preparation(stripped_of(info), f"synthetic set {path} (its GAN's training patches)",
                          "train its GAN again on patches extracted as the volumes are now read")
    device = resolve_device(args.device)
    scorer = critic_scorer(info.get("trial"), info.get("epoch"), device) if info.get("trial") else None
    print(f"auditing {path}: {len(synthetic['img'])} synthetic pairs, {len(members['img'])} training patches, "
          f"{len(held_out['img'])} held-out patches; white-box critic: {'yes' if scorer else 'not available'}",
          flush=True)
    result, curves = membership_audit(synthetic, members, held_out, critic_score=scorer)
    result = {"set": set_name, "synthetic": str(path), "synthetic_sha256": digest,
              "epsilon_valid": info.get("epsilon_valid", "unknown"),
              "threat_model": "black box: the released synthetic pairs only; white box (critic_auc): also the "
                              "critic, which is internal and never released", **result}
    save_json(json_path, result)
    roc_figure(roc_path, curves, f"{set_name}: MIA AUC {result['mia_auc']:.3f}, control {result['control_auc']:.3f}")
    return result, json_path


# ---- audit_privacy.py --canaries ----
def canary_verdict(lower, theoretical):
    if lower > theoretical:
        return (f"DP VIOLATED at 95% confidence: the audit's lower bound {lower:.3g} exceeds the accounted epsilon "
                f"{theoretical:.3g}: the DP code or its accounting most likely has a bug (a correct one shows this "
                f"in at most 5% of audits)")
    return (f"consistent: lower bound {lower:.3g} <= accounted epsilon {theoretical:.3g} (a bound far below epsilon "
            f"says these attacks are weak or the accounting loose, not which)")


def audit_canary_run(args):
    """audit_privacy.py --canaries: the epsilon lower bound of a canary run (run_gan.py --audit_canaries) at one
    epoch, from the critic's scores (white box) and, if the trial's synthetic set of that epoch exists, the
    distance to its nearest pair (black box). Writes WORK_DIR/results/WGAN_<trial>_<epoch>_canary_audit.json."""
    from utils.canaries import audited_path, canaries_path, canary_audit, load_canaries
    from utils.common import gan_results_dir, load_json, refuse_existing, resolve_device, save_json, synthetic_path
    from utils.release import trial_privacy

    if args.synthetic is not None or args.trial is None or args.epoch is None:
        raise PipelineError("--canaries audits a canary run: give --trial and --epoch (the checkpoint to audit; "
                            "--thresh names its synthetic set), not --synthetic")
    json_path = audit_paths(f"WGAN_{args.trial}_{args.epoch}_canary")[0]
    if not args.overwrite:
        refuse_existing(json_path)
    results_dir = gan_results_dir(args.trial)
    trial_config = load_json(results_dir / "config.json", "trial config")
    canaries = load_canaries(canaries_path(results_dir))
    this_audit = {"epoch": args.epoch, "thresh": args.thresh}
    first = load_json(audited_path(results_dir), "canary audit record") if audited_path(results_dir).is_file() \
        else this_audit
    if first != this_audit:
        raise PipelineError(f"trial {args.trial!r}: its canary draw was audited already (epoch {first['epoch']}, "
                            f"--thresh {first['thresh']}; {audited_path(results_dir)}): a second look at the same "
                            f"draw and keeping the larger bound is no 95% bound. Audit that epoch and set again, or "
                            f"train a new canary run")
    privacy_ = trial_privacy(args.trial, trial_config, args.epoch)  # the accounted epsilon of that checkpoint
    critic = critic_scorer(args.trial, args.epoch, resolve_device(args.device))
    scores = {"critic score (white box; internal)": critic(canaries["img"], canaries["label"])}
    set_path = synthetic_path(args.trial, args.epoch, args.thresh)
    if set_path.is_file():
        synthetic = load_pairs(set_path, "synthetic set")
        to_synthetic = nearest_distances(features(canaries["img"], canaries["label"]),
                                         features(synthetic["img"], synthetic["label"]))
        scores["nearest synthetic pair (black box)"] = -to_synthetic
        black_box = str(set_path)
    else:
        black_box = (f"not computed: no synthetic set {set_path} (python generate_samples.py --trial {args.trial} "
                     f"--epoch {args.epoch} --thresh {args.thresh})")
    print(f"auditing the {len(canaries['included'])} canaries of trial {args.trial!r} at epoch {args.epoch}: "
          f"{', '.join(scores)}", flush=True)
    result = canary_audit(scores, canaries["included"], privacy_["delta"])
    result = {"trial": args.trial, "epoch": args.epoch, "method": "one-run audit, Steinke, Nasr and Jagielski 2023 "
              "(Theorem 5.2), Bonferroni over attacks and numbers of guesses", "black_box_set": black_box,
              "epsilon_theoretical": privacy_["epsilon_valid"],
              "epsilon_theoretical_prv": privacy_["epsilon_valid_prv"], **result}
    result["verdict"] = canary_verdict(result["epsilon_lower_bound"], result["epsilon_theoretical"])
    save_json(audited_path(results_dir), this_audit)
    save_json(json_path, result)
    return result, json_path
