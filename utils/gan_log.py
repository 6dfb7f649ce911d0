"""A GAN run's training log (results/<trial>/log.csv), its figures and its one line per epoch.

The losses, critic scores and DP diagnostics in them are internal: computed on training patches without noise, they
are not covered by epsilon and never leave the hospital (docs/outputs.md lists every column).
"""

import csv
import math

from utils.common import PipelineError, atomic_write, save_figure

# DP diagnostics (internal, like the losses): the median per-sample gradient norm before clipping, the fraction of
# samples clipped, and the norm of the noise over the norm of the clipped sum, averaged over the epoch's steps.
DP_DIAGNOSTICS = ("grad_norm_median", "clipped_fraction", "noise_to_signal")
LOG_COLUMNS = ("epoch", "loss_d", "loss_g", "wasserstein", "d_real", "d_fake", "epsilon", "epsilon_valid",
               "epsilon_valid_prv", *DP_DIAGNOSTICS, "steps", "generator_updates", "n_discr", "seconds")
COUNT_COLUMNS = ("epoch", "steps", "generator_updates", "n_discr")
LATER_COLUMNS = ("generator_updates", "n_discr")  # absent from the logs of earlier versions


def describe_diagnostics(row):
    if math.isnan(row["grad_norm_median"]):
        return ""
    return (f" | DP: median grad norm {row['grad_norm_median']:.3g}, clipped {row['clipped_fraction']:.0%}, "
            f"noise/signal {row['noise_to_signal']:.3g}")


def describe_group_privacy(group):
    """One line for privacy.group_privacy's dict."""
    if group["group_size"] == 1:
        return f"epsilon {group['epsilon']:.4g}, delta {group['delta']:.3g} (patient-level DP: the guarantee itself)"
    if not group["meaningful"]:
        return f"no meaningful guarantee (group of {group['group_size']} patches: delta >= 1)"
    return f"epsilon {group['epsilon']:.4g}, delta {group['delta']:.3g} (group of {group['group_size']} patches)"


def write_log(path, rows):
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: row[k] for k in LOG_COLUMNS})

    atomic_write(path, write)


def count_or_nan(text):
    """A count column's value: an int, or nan where an earlier version's row lacked the column."""
    value = float(text)
    return value if math.isnan(value) else int(value)


def read_log(path):
    """log.csv rows with numbers as numbers ("inf" epsilon of a non-private run included); [] if there is no log.
    A column added since (LATER_COLUMNS) that the log of an earlier version lacks reads as nan."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    try:
        return [{**dict.fromkeys(LATER_COLUMNS, math.nan),
                 **{k: count_or_nan(v) if k in COUNT_COLUMNS else float(v) for k, v in row.items()}} for row in rows]
    except (TypeError, ValueError) as err:
        raise PipelineError(f"GAN log {path} has a value that is not a number: {err}") from None


def plot_losses(path, rows):
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("loss_d", "critic loss"), ("loss_g", "generator loss"), ("wasserstein", "Wasserstein est.")):
        ax.plot(epochs, [r[key] for r in rows], marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean over the epoch")
    ax.set_title("internal: computed on training patches without noise, do not share", fontsize=8)
    ax.legend()
    save_figure(path, fig)


def plot_epsilon(path, rows, dp_mode):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [r["epoch"] for r in rows]
    if math.isinf(rows[-1]["epsilon"]):
        ax.text(0.5, 0.5, "non-private run: epsilon = inf", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.plot(epochs, [r["epsilon_valid"] for r in rows], marker="o", label="valid epsilon (RDP)")
        ax.plot(epochs, [r["epsilon_valid_prv"] for r in rows], marker="^", label="valid epsilon (PRV)")
        if dp_mode == "paper":
            ax.plot(epochs, [r["epsilon"] for r in rows], marker="s", label="the paper's count (not a valid bound)")
        ax.legend()
    ax.set_xlabel("epoch")
    ax.set_ylabel("epsilon")
    save_figure(path, fig)


def plot_samples(path, samples, epoch):
    """Generated pairs from the fixed noise batch: one column per sample, image above label."""
    import matplotlib.pyplot as plt

    n = len(samples)
    fig, axes = plt.subplots(2, n, figsize=(1.5 * n, 3.3), squeeze=False)
    for j in range(n):
        for i, name in enumerate(("image", "label")):
            axes[i, j].imshow(samples[j, i], cmap="gray", vmin=-1, vmax=1)
            axes[i, j].axis("off")
            if j == 0:
                axes[i, j].set_title(name, fontsize=8, loc="left")
    fig.suptitle(f"epoch {epoch}: fixed noise")
    save_figure(path, fig)
