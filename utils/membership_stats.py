"""The statistics of a membership-inference audit (utils/audit.py, docs/audit.md): ROC AUC, its patient-level
bootstrap interval, TPR at a low FPR, the ROC curve, and the permutation test over which patients are members.

Scores are larger for members. Patches of one patient are not independent, so intervals resample patients and the
test permutes patients, never patches.
"""

import itertools
import math

import numpy as np

N_BOOTSTRAP = 1000
FPR_LEVELS = (0.01, 0.001)
TEST_LEVEL = 0.05
MAX_ENUMERATED = 20_000  # assignments of member labels to patients enumerated exactly; more are sampled
N_RANDOM_ASSIGNMENTS = 9_999
TEST_ASSUMES = ("the synthetic set does not depend on which patients trained the GAN (the null hypothesis); the "
                "split of patients into training and held-out could have been any other (a random split; held-out "
                "patients from another site or protocol than the training patients break this); patients are "
                "independent of each other, patches of one patient need not be")


def auc(members, non_members):
    """ROC AUC of scores (larger = member): P(member score > non-member score), ties counted half."""
    members, non_members = np.asarray(members, float), np.asarray(non_members, float)
    if len(members) == 0 or len(non_members) == 0:
        raise ValueError("AUC needs at least one member and one non-member score")
    ranks = _ranks(np.concatenate([members, non_members]))
    n1, n0 = len(members), len(non_members)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _ranks(values):
    from scipy.stats import rankdata

    return rankdata(values)


def patient_groups(scores, patients):
    """The scores of each patient (sorted ids) as a list of arrays, and the ids."""
    ids = np.unique(patients)
    return [np.asarray(scores)[patients == p] for p in ids], ids


def patient_level(groups):
    """A patient's score: the mean of his patches' scores."""
    return np.array([g.mean() for g in groups])


def patch_level(groups):
    return np.concatenate(groups)


def cluster_auc_ci(member_groups, non_groups, level, seed, n_bootstrap=N_BOOTSTRAP):
    """(AUC, [2.5%, 97.5%] interval or None) of per-patient score groups; level: patch_level or patient_level.
    The interval resamples patients (each with all his scores) within members and within non-members: patches
    of one patient are not independent. None when a side has a single patient (nothing to resample)."""
    value = auc(level(member_groups), level(non_groups))
    if min(len(member_groups), len(non_groups)) < 2:
        return value, None
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_bootstrap):
        m = [member_groups[i] for i in rng.integers(len(member_groups), size=len(member_groups))]
        n = [non_groups[i] for i in rng.integers(len(non_groups), size=len(non_groups))]
        draws.append(auc(level(m), level(n)))
    return value, [float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975))]


def tpr_at_fpr(members, non_members, fpr):
    """TPR at the strictest threshold whose FPR is at most `fpr` (with n non-members, FPR resolves only 1/n)."""
    ordered = np.sort(np.asarray(non_members, float))[::-1]
    k = int(math.floor(fpr * len(ordered)))
    threshold = ordered[k] if k < len(ordered) else -math.inf
    return float(np.mean(np.asarray(members, float) > threshold))


def roc_curve(members, non_members):
    """(FPR, TPR) arrays of every threshold."""
    scores = np.concatenate([members, non_members])
    truth = np.concatenate([np.ones(len(members)), np.zeros(len(non_members))])
    order = np.argsort(-scores, kind="stable")
    tpr = np.concatenate([[0], np.cumsum(truth[order]) / len(members)])
    fpr = np.concatenate([[0], np.cumsum(1 - truth[order]) / len(non_members)])
    return fpr, tpr


def membership_test(member_patient_scores, non_patient_scores, seed):
    """Permutation test of "no membership signal" over which patients are members, statistic the patient-level
    AUC: exact over all C(m + h, m) assignments when there are at most MAX_ENUMERATED, else over
    N_RANDOM_ASSIGNMENTS random ones (and the observed). Returns the test's dict (p_value, smallest_attainable_p,
    ...)."""
    m, h = len(member_patient_scores), len(non_patient_scores)
    ranks = _ranks(np.concatenate([member_patient_scores, non_patient_scores]))
    n_assignments = math.comb(m + h, m)
    exhaustive = n_assignments <= MAX_ENUMERATED
    if exhaustive:
        members = np.zeros((n_assignments, m + h), bool)
        for row, chosen in enumerate(itertools.combinations(range(m + h), m)):
            members[row, list(chosen)] = True
    else:
        order = np.argsort(np.random.default_rng([seed, 29]).random((N_RANDOM_ASSIGNMENTS, m + h)), axis=1)
        members = np.zeros((N_RANDOM_ASSIGNMENTS, m + h), bool)
        np.put_along_axis(members, order[:, :m], True, axis=1)
    # the patient-level AUC of every assignment from the ranks of the patients' scores (Mann-Whitney U / (m h))
    aucs = (members @ ranks - m * (m + 1) / 2) / (m * h)
    observed = (ranks[:m].sum() - m * (m + 1) / 2) / (m * h)
    reaching = int(np.sum(aucs >= observed - 1e-9))
    p_value = reaching / n_assignments if exhaustive else (1 + reaching) / (1 + N_RANDOM_ASSIGNMENTS)
    return {"statistic": "patient-level AUC (a patient's score: the mean of his patches' scores)",
            "p_value": float(p_value), "level": TEST_LEVEL, "n_member_patients": m, "n_non_member_patients": h,
            "assignments": n_assignments, "exhaustive": exhaustive,
            "assignments_drawn": n_assignments if exhaustive else N_RANDOM_ASSIGNMENTS,
            "smallest_attainable_p": 1 / n_assignments if exhaustive else 1 / (1 + N_RANDOM_ASSIGNMENTS),
            "assumes": TEST_ASSUMES}


def summarise_attack(member_groups, non_groups, seed):
    """Patch-level AUC with its patient-level interval and TPR at low FPR (descriptive)."""
    value, ci = cluster_auc_ci(member_groups, non_groups, patch_level, seed)
    members, non_members = patch_level(member_groups), patch_level(non_groups)
    return {"auc": value, "auc_ci95": ci, **{f"tpr_at_{level * 100:g}pct_fpr": tpr_at_fpr(members, non_members, level)
                                            for level in FPR_LEVELS}}
