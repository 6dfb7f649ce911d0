"""Every evaluated training input side by side: one CSV, one table, the paper's figures against epsilon."""

import csv
import math
from pathlib import Path

import config
from utils.audit import audit_paths
from utils.common import PipelineError, atomic_write, load_json, save_figure

# (CSV column, key in <train_input>_results.json, part of a {"mean", "sd"} value or None)
COLUMNS = [
    ("training_input", "training_input", None), ("epsilon", "epsilon", None),
    ("epsilon_valid", "epsilon_valid", None), ("epsilon_valid_prv", "epsilon_valid_prv", None),
    ("dp_mode", "dp_mode", None),
    ("noise_multiplier", "noise_multiplier", None), ("gan_epoch", "gan_epoch", None),
    ("best_unet", "best_unet", None), ("val_dsc", "val_dsc", "mean"),
    ("test_dsc", "test_dsc", "mean"), ("test_dsc_sd", "test_dsc", "sd"),
    ("test_bahd", "test_bahd", "mean"), ("test_bahd_sd", "test_bahd", "sd"),
    ("test2_dsc", "test2_dsc", "mean"), ("test2_dsc_sd", "test2_dsc", "sd"),
    ("test2_bahd", "test2_bahd", "mean"), ("test2_bahd_sd", "test2_bahd", "sd"),
    ("fid_train", "fid_train", None), ("fid_test", "fid_test", None), ("fid_difference", "fid_difference", None),
    ("ssim_generated", "ssim_generated", None), ("ssim_real", "ssim_real", None),
    ("mia_auc", "mia_auc", None), ("patient_auc", "patient_auc", None), ("control_auc", "control_auc", None),
]
# The CSV's `epsilon` is what the run counted (paper mode: the paper's count, not a valid bound); the table shows
# only valid bounds.
TABLE = [("training input", "training_input", "{}"), ("valid eps", "epsilon_valid", "{}"),
         ("eps PRV", "epsilon_valid_prv", "{}"), ("test DSC", "test_dsc", "{:.3f}"),
         ("test2 DSC", "test2_dsc", "{:.3f}"), ("test bAHD", "test_bahd", "{:.2f}"),
         ("test2 bAHD", "test2_bahd", "{:.2f}"), ("FID train", "fid_train", "{:.1f}"),
         ("FID test", "fid_test", "{:.1f}"), ("SSIM gen", "ssim_generated", "{:.3f}"),
         ("SSIM real", "ssim_real", "{:.3f}"), ("MIA AUC", "mia_auc", "{:.3f}")]


def results_dir():
    return config.WORK_DIR / "results"


def collect(folder=None):
    """One row (dict of COLUMNS) per <train_input>_results.json in the results folder, sorted by name."""
    folder = Path(folder or results_dir())
    paths = sorted(folder.glob("*_results.json"))
    if not paths:
        raise PipelineError(f"no *_results.json in {folder}; run eval_unet.py first")
    rows = []
    for path in paths:
        result = load_json(path, "result file")
        row = {}
        for column, key, part in COLUMNS:
            value = result.get(key)
            if part is not None:
                value = value.get(part) if isinstance(value, dict) else None
            row[column] = value
        audit = audit_paths(row["training_input"], folder)[0]
        if row["training_input"] != "real" and audit.is_file():  # audited after its evaluation: the audit's own file
            row.update({k: load_json(audit, "privacy audit").get(k) for k in ("mia_auc", "patient_auc", "control_auc")})
        if "fid" in result and row["fid_train"] is None:  # "not computed: <reason>" / "not applicable"
            row["fid_train"] = row["fid_test"] = result["fid"]
        rows.append(row)
    return rows


def number(value):
    """A float for plotting, or None for text ("real data", "not computed: ...") and missing values."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def write_csv(rows, path):
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[c for c, _, _ in COLUMNS])
            writer.writeheader()
            writer.writerows(rows)

    return atomic_write(path, write)


def format_table(rows):
    """A plain-text side-by-side table; text values (real data, not computed) are shortened, not hidden."""

    def cell(value, fmt):
        x = number(value)
        if fmt == "{}" and x is None:  # names and "real data" in full
            return "-" if value is None else str(value)
        if x is None:  # "not computed: <why>", "not applicable (...)": the result file says the rest
            return "-" if value is None else str(value).split(":")[0].split(" (")[0]
        return "inf" if math.isinf(x) else fmt.format(x) if fmt != "{}" else f"{x:.3g}"

    cells = [[head for head, _, _ in TABLE]] + [[cell(r[k], fmt) for _, k, fmt in TABLE] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(TABLE))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def plot_against_epsilon(rows, path):
    """The paper's figures: DSC, bAHD, FID (train, test) and SSIM against epsilon (non-private at the right)."""
    import matplotlib.pyplot as plt

    private = [r for r in rows if number(r["epsilon_valid"]) is not None]
    finite = [number(r["epsilon_valid"]) for r in private if not math.isinf(number(r["epsilon_valid"]))]
    inf_at = (max(finite) * 1.25 if finite else 1.0)

    def x_of(r):
        eps = number(r["epsilon_valid"])
        return inf_at if math.isinf(eps) else eps

    real = {r["training_input"]: r for r in rows if r["epsilon"] == "real data"}
    panels = [("DSC", ["test_dsc", "test2_dsc"]), ("bAHD (mm)", ["test_bahd", "test2_bahd"]),
              ("FID", ["fid_train", "fid_test"]), ("SSIM", ["ssim_generated"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), layout="constrained")
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            points = sorted((x_of(r), number(r[key])) for r in private if number(r[key]) is not None)
            if points:
                ax.plot(*zip(*points), "o-", label=key)
            for name, r in real.items():
                if number(r[key]) is not None:
                    ax.axhline(number(r[key]), ls="--", lw=1, color="grey", label=f"{key} ({name})")
        ssim_real = next((number(r["ssim_real"]) for r in rows if number(r["ssim_real"]) is not None), None)
        if title == "SSIM" and ssim_real is not None:
            ax.axhline(ssim_real, ls=":", color="k", label="SSIM real images")
        ax.set_title(title)
        ax.set_xlabel("valid epsilon")
        if any(math.isinf(number(r["epsilon_valid"])) for r in private):
            ticks = [t for t in ax.get_xticks() if 0 <= t < inf_at * 0.9]
            ax.set_xticks(ticks + [inf_at], [f"{t:g}" for t in ticks] + ["inf"])
        if ax.has_data():
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    return save_figure(path, fig)


def compare(folder=None):
    """Collect, write summary.csv and the figure into the results folder; returns (rows, table text)."""
    folder = Path(folder or results_dir())
    rows = collect(folder)
    write_csv(rows, folder / "summary.csv")
    plot_against_epsilon(rows, folder / "summary_vs_epsilon.png")
    return rows, format_table(rows)
