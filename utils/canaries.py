"""One-run privacy audit of DP training with canaries (Steinke, Nasr and Jagielski 2023; docs/audit.md).

run_gan.py --audit_canaries M makes M canary pairs and includes each in the training set independently with
probability 1/2; audit_privacy.py --canaries scores every canary with the trained critic (white box) and by its
distance to the trial's synthetic set (black box), guesses "in" for the most member-like and "out" for the least,
and turns the number of correct guesses into an epsilon lower bound at 95% confidence.

Canary: a training patch (of the patches file; its original stays in the training set) whose central square
(half the patch wide) is overwritten by a 4 x 4 grid of cells, each bright with a vessel label or dark without,
after a 16-bit code unique to the canary. Why: a code is a vessel-like bright pattern the GAN can draw, nothing a
real patch shows, and unique, so that what the model learns of one canary tells nothing of another (a fixed
pattern shared by all canaries would be learned from any half of them and could not tell them apart); the base
patch keeps the canary within the data's distribution outside the square, and since the original base patch is a
member whether the canary is in or out, only the code carries the canary's membership.

The bound (Steinke et al., Theorem 5.2): if training is (epsilon, delta)-DP with respect to adding or removing one
canary, m canaries are included with probability 1/2 each and the auditor makes r guesses, the number W of
correct guesses satisfies, for every v,
    P[W >= v] <= f(v) + 2 m delta max_{i = 1..m} (f(v - i) - f(v)) / i,
    f(v) = P[Binomial(r, e^eps / (e^eps + 1)) >= v].
The lower bound is the largest epsilon this p-value rejects at level 0.05. The auditor tries several numbers of
guesses and both attacks; each is tested at 0.05 / (number of tries) (Bonferroni), so the largest of them is
still a 95% bound.
"""

import math

import numpy as np
from scipy.stats import binom

import config
from utils.common import PipelineError, load_npz, save_npz

CODE_GRID = 4  # cells per side of the code: 16 bits
CONFIDENCE = 0.95
# numbers of guesses tried, as fractions of the canaries (half "in" from the top, half "out" from the bottom)
GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
CANARY_KEYS = ("img", "label", "included", "code", "base_index")


# ---- the canaries ----
def code_square(patch_size):
    """(offset, cell) of the code's square: CODE_GRID cells of patch_size / 8 pixels, centred."""
    cell = patch_size // (2 * CODE_GRID)
    if cell < 1:
        raise PipelineError(f"config.PATCH_SIZE {patch_size}: too small for a canary code of {CODE_GRID} x "
                            f"{CODE_GRID} cells")
    return (patch_size - CODE_GRID * cell) // 2, cell


def code_bits(codes):
    """n codes (ints) -> n x CODE_GRID x CODE_GRID bool cells."""
    bits = (np.asarray(codes)[:, None] >> np.arange(CODE_GRID * CODE_GRID)) & 1
    return bits.reshape(-1, CODE_GRID, CODE_GRID).astype(bool)


def stamp(img, label, codes):
    """Copies of the patches with their codes stamped: bright cells at the patch's maximum with label 1, dark cells
    at its minimum with label 0; outside the square the patch is unchanged."""
    img, label = np.array(img, copy=True), np.array(label, copy=True)
    offset, cell = code_square(img.shape[-1])
    cells = np.kron(code_bits(codes), np.ones((cell, cell), bool))  # n x side x side
    square = (slice(None), slice(offset, offset + cells.shape[1]), slice(offset, offset + cells.shape[2]))
    high = img.reshape(len(img), -1).max(1)[:, None, None]
    low = img.reshape(len(img), -1).min(1)[:, None, None]
    img[square] = np.where(cells, high, low)
    label[square] = cells
    return img, label


def make_canaries(img, label, m, rng):
    """m canaries from distinct patches of (img, label), codes drawn without repetition, and the inclusion draw.
    rng: numpy Generator. Returns a dict with CANARY_KEYS."""
    n_codes = 2 ** (CODE_GRID * CODE_GRID) - 1
    if not 1 <= m <= min(len(img), n_codes):
        raise PipelineError(f"--audit_canaries {m}: must lie between 1 and {min(len(img), n_codes)} (the training "
                            f"patches, and the {n_codes} distinct codes)")
    base = np.sort(rng.choice(len(img), size=m, replace=False))
    codes = rng.choice(n_codes, size=m, replace=False) + 1  # no all-dark code
    canary_img, canary_label = stamp(img[base], label[base], codes)
    return {"img": canary_img.astype(np.float32), "label": canary_label.astype(np.uint8),
            "included": rng.random(m) < 0.5, "code": codes, "base_index": base}


def canaries_path(results_dir):
    """Internal: which canaries were included is exactly what the audit must not know before it guesses."""
    return results_dir / "canaries.npz"


def audited_path(results_dir):
    """The one audit a canary draw allows: auditing the same draw at other epochs or sets and keeping the largest
    bound would not be a 95% bound any more."""
    return results_dir / "canaries_audited.json"


def save_canaries(path, canaries):
    save_npz(path, **canaries)


def load_canaries(path):
    if not path.is_file():
        raise PipelineError(f"canaries file {path} does not exist: the trial was not trained with "
                            f"run_gan.py --audit_canaries M")
    canaries = load_npz(path, CANARY_KEYS, "canaries file")
    size = (config.PATCH_SIZE, config.PATCH_SIZE)
    if canaries["img"].shape[1:] != size or canaries["label"].shape != canaries["img"].shape:
        raise PipelineError(f"canaries file {path}: img {canaries['img'].shape} and label "
                            f"{canaries['label'].shape} must both be M x {size[0]} x {size[1]}")
    return canaries


# ---- the bound ----
def p_value(epsilon, delta, m, r, v):
    """P[W >= v] allowed by (epsilon, delta)-DP for v correct guesses out of r among m canaries (Theorem 5.2)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct {v} <= guesses {r} <= canaries {m}")
    q = 1 / (1 + math.exp(-epsilon))
    tail = binom.sf(v - 1, r, q)  # f(v) = P[Bin(r, q) >= v]
    if delta == 0 or v == 0:
        return min(1.0, tail)
    # (f(v - i) - f(v)) / i = P[v - i <= Bin < v] / i; for i > v, f(v - i) = 1 and the ratio only falls
    i = np.arange(1, v + 1)
    below = np.cumsum(binom.pmf(v - i, r, q))  # P[v - i <= Bin < v] for i = 1..v
    return min(1.0, tail + 2 * m * delta * float((below / i).max()))


def epsilon_lower_bound(m, r, v, delta=0.0, alpha=1 - CONFIDENCE, tolerance=1e-4):
    """The largest epsilon whose p-value for v of r correct guesses (m canaries) is below alpha: training with a
    smaller epsilon would make this many correct guesses less likely than alpha. 0 when even epsilon 0 is not
    rejected (chance level), and 0 when 2 m delta >= 1: the p-value is proven to rise with epsilon (which the
    search needs) only below that (canary_audit says so)."""
    if 2 * m * delta >= 1 or p_value(0.0, delta, m, r, v) >= alpha:
        return 0.0
    high = 1.0
    while p_value(high, delta, m, r, v) < alpha:  # ends: as epsilon grows, every guess right becomes likely
        high *= 2
    low = 0.0
    while high - low > tolerance:  # p-value rises with epsilon: keep p(low) < alpha <= p(high)
        middle = (low + high) / 2
        low, high = (middle, high) if p_value(middle, delta, m, r, v) < alpha else (low, middle)
    return low


def guess_counts(m):
    """The numbers of guesses tried (even, at least 2, at most m)."""
    return sorted({min(m - m % 2, max(2, 2 * round(f * m / 2))) for f in GUESS_FRACTIONS})


def guesses(scores, included, r):
    """(correct guesses, r): "in" for the r/2 highest scores, "out" for the r/2 lowest (ties broken by index)."""
    order = np.argsort(-np.asarray(scores, float), kind="stable")
    top, bottom = order[:r // 2], order[len(order) - (r - r // 2):]
    return int(included[top].sum() + (~included[bottom]).sum()), r


def canary_audit(scores_by_attack, included, delta):
    """Epsilon lower bounds from every attack's scores (larger = more likely included), Bonferroni-corrected over
    attacks and numbers of guesses. Returns the audit dict."""
    included = np.asarray(included, bool)
    m = len(included)
    counts = guess_counts(m)
    alpha = (1 - CONFIDENCE) / (len(counts) * len(scores_by_attack))
    per_attack = {}
    for name, scores in scores_by_attack.items():
        tries = []
        for r in counts:
            v, r = guesses(scores, included, r)
            tries.append({"guesses": r, "correct": v, "epsilon_lower_bound": epsilon_lower_bound(m, r, v, delta,
                                                                                                 alpha)})
        per_attack[name] = {**max(tries, key=lambda t: t["epsilon_lower_bound"]), "tries": tries}
    name = max(per_attack, key=lambda a: per_attack[a]["epsilon_lower_bound"])
    best = {"attack": name, **{k: v for k, v in per_attack[name].items() if k != "tries"}}
    result = {"n_canaries": m, "n_included": int(included.sum()), "delta": delta, "confidence": CONFIDENCE,
              "tests": len(counts) * len(scores_by_attack), "per_test_alpha": alpha,
              "epsilon_lower_bound": best["epsilon_lower_bound"], "best": best, "attacks": per_attack}
    if 2 * m * delta >= 1:
        result["note"] = (f"2 m delta = {2 * m * delta:.3g} >= 1: this audit can show no bound (lower bound 0 by "
                          f"construction); use far fewer canaries than training patches, or a smaller config.DELTA")
    return result
