"""Every evaluated training input side by side: one CSV, one table, the paper's figures against epsilon.

The best run per noise multiplier is chosen by looking at every run of that noise (their val DSC), so it is a
function of all of them: the epsilon shown for it is theirs composed (utils/release.py runs_privacy: sequential,
the runs taken to have trained on the same patients), beside the single run's.
"""

import csv
import math
from pathlib import Path

import config
from utils.audit import audit_paths
from utils.common import PipelineError, atomic_write, file_sha256, load_json, save_figure
from utils.release import release_dir, runs_privacy, trial_privacy

# (CSV column, key in <train_input>_results.json, part of a {"mean", "sd"} value or None)
COLUMNS = [
    ("training_input", "training_input", None), ("epsilon", "epsilon", None),
    ("epsilon_valid", "epsilon_valid", None), ("epsilon_valid_prv", "epsilon_valid_prv", None),
    ("dp_mode", "dp_mode", None), ("privacy_unit", "privacy_unit", None), ("started_from", "started_from", None),
    ("noise_multiplier", "noise_multiplier", None), ("gan_epoch", "gan_epoch", None),
    ("best_unet", "best_unet", None), ("val_dsc", "val_dsc", "mean"),
    ("test_dsc", "test_dsc", "mean"), ("test_dsc_sd", "test_dsc", "sd"), ("test_dsc_brain", "test_dsc_brain", "mean"),
    ("test_bahd", "test_bahd", "mean"), ("test_bahd_sd", "test_bahd", "sd"),
    ("test2_dsc", "test2_dsc", "mean"), ("test2_dsc_sd", "test2_dsc", "sd"),
    ("test2_dsc_brain", "test2_dsc_brain", "mean"),
    ("test2_bahd", "test2_bahd", "mean"), ("test2_bahd_sd", "test2_bahd", "sd"),
    ("fid_train", "fid_train", None), ("fid_test", "fid_test", None), ("fid_difference", "fid_difference", None),
    ("ssim_generated", "ssim_generated", None), ("ssim_real", "ssim_real", None),
    ("mia_auc", "mia_auc", None), ("patient_auc", "patient_auc", None), ("control_auc", "control_auc", None),
]
# The CSV's `epsilon` is what the run counted (paper mode: the paper's count, not a valid bound); the table shows
# only valid bounds.
TABLE = [("training input", "training_input", "{}"), ("privacy unit", "privacy_unit", "{}"),
         ("GAN start", "started_from", "{}"),
         ("valid eps", "epsilon_valid", "{}"),
         ("eps PRV", "epsilon_valid_prv", "{}"), ("test DSC", "test_dsc", "{:.3f}"),
         ("test2 DSC", "test2_dsc", "{:.3f}"), ("test DSC in brain", "test_dsc_brain", "{:.3f}"),
         ("test bAHD", "test_bahd", "{:.2f}"),
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
    rows, stale, hashes = [], [], {}
    for path in paths:
        result = load_json(path, "result file")
        stale += stale_inputs(path, result, audit_paths(result.get("training_input"), folder)[0], hashes)
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
        row["run"] = run_of(result)  # not a CSV column: what a pick among runs composes
        rows.append(row)
    if stale:
        raise PipelineError("results that no longer describe their inputs (nothing was written):\n  - "
                            + "\n  - ".join(stale))
    return rows


def stale_inputs(result_path, result, audit_path, hashes):
    """What changed since a result (or its set's audit, or its set's release bundle) was computed from it: a line
    per problem with the command that brings it up to date; [] when everything matches. hashes caches file_sha256."""
    def digest(path):
        if path not in hashes:
            hashes[path] = file_sha256(path)
        return hashes[path]

    data, name = Path(result.get("training_data") or "none"), result.get("training_input")
    if not data.is_file():
        return []
    info = load_json(data.with_suffix(".json"), "synthetic set information") if name != "real" and \
        data.with_suffix(".json").is_file() else {}
    flags = "--real" if name == "real" else f"--trial {info.get('trial')} --epoch {info.get('epoch_requested')} " \
                                             f"--thresh {info.get('thresh')}"
    problems = []
    if result.get("training_sha256") not in (None, digest(data)):
        problems.append(f"{result_path} was computed on other contents of {data} (regenerated since): run "
                        f"`python run_unet.py {flags} --overwrite` and `python eval_unet.py {flags} --overwrite`")
    audit = load_json(audit_path, "privacy audit") if name != "real" and audit_path.is_file() else {}
    if audit.get("synthetic_sha256") not in (None, digest(data)):
        problems.append(f"{audit_path} audited other contents of {data} (regenerated since): run "
                        f"`python audit_privacy.py {flags} --overwrite`")
    bundle = release_dir(name) / "synthetic.npz"
    if name != "real" and bundle.is_file() and digest(bundle) != digest(data):
        problems.append(f"the release bundle {bundle.parent} holds other pairs than the set {data}: run "
                        f"`python generate_samples.py {flags} --overwrite`")
    return problems


def run_of(result):
    """The GAN run behind a result, as runs_privacy() takes it, from its synthetic set's JSON (its accountant
    history, or for a set written before that was recorded, the checkpoint's); None where neither says."""
    info_path = Path(result.get("training_data") or "none").with_suffix(".json")
    if result.get("training_input") == "real" or not info_path.is_file():
        return None
    info = load_json(info_path, "synthetic set information")
    epoch = info.get("selection", {}).get("privacy_of_epoch", info.get("epoch"))
    if "accountant_history" in info:
        return {"trial": info["trial"], "epoch": epoch, "history": info["accountant_history"], "delta": info["delta"],
                "privacy_unit": info.get("privacy_unit", "patch"), "epsilon_valid": info["epsilon_valid_single_run"]}
    from utils.synthesis import read_trial_config

    try:
        return trial_privacy(info["trial"], read_trial_config(info["trial"]), epoch)
    except (PipelineError, KeyError):
        return None


def pick_epsilon(rows):
    """The valid epsilon of a run picked among `rows` by looking at their results: every run composed (one entry
    per trial, its longest history), or a text saying which runs lack an accountant history."""
    unknown = [r["training_input"] for r in rows if r.get("run") is None]
    if unknown:
        return f"unknown: no accountant history for {', '.join(unknown)} (regenerate the set)"
    runs = {}
    for r in rows:
        run = r["run"]
        if run["trial"] not in runs or sum(h[2] for h in run["history"]) > sum(
                h[2] for h in runs[run["trial"]]["history"]):
            runs[run["trial"]] = run
    return runs_privacy(list(runs.values()))["epsilon_valid"]


def number(value):
    """A float for plotting, or None for text ("real data", "not computed: ...") and missing values."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def write_csv(rows, path):
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[c for c, _, _ in COLUMNS], extrasaction="ignore")
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


# The paper's numbers (Kossen et al. 2022, Table 1 and Figure 6; real patients, not these phantoms), by the
# epsilon the paper reported (its count, not a valid bound): the non-private one is drawn beside ours.
PAPER_VALUES = {"test_dsc": {"inf": 0.84, "7.4": 0.75, "real": 0.89}, "test2_dsc": {"inf": 0.88, "7.4": 0.69,
                                                                                    "real": 0.90},
                "test_bahd": {"inf": 0.61, "7.4": 2.49, "real": 0.33}, "test2_bahd": {"inf": 0.58, "7.4": 2.87,
                                                                                      "real": 0.69},
                "fid_train": {"inf": 62.0, "5.7": 244.0, "10.2": 228.0}}
AGGREGATED = ("epsilon_valid", "test_dsc", "test2_dsc", "test_bahd", "test2_bahd", "fid_train", "fid_test",
              "fid_difference", "ssim_generated", "mia_auc")


def aggregate_by_noise(rows):
    """Mean and SD over seeds per (noise multiplier, DP mode) of the synthetic sets, and the best run of each (the
    highest mean val DSC: chosen without looking at the test sets) with its epsilon alone and that of the pick
    (every run of the group composed: the pick is a function of all of them). Rows of real data are left out."""
    groups = {}
    for r in rows:
        if number(r["noise_multiplier"]) is not None:
            groups.setdefault((number(r["noise_multiplier"]), r["dp_mode"]), []).append(r)
    out = []
    for (noise, mode), members in sorted(groups.items(), key=lambda kv: (-kv[0][0], str(kv[0][1]))):
        row = {"noise_multiplier": noise, "dp_mode": mode, "runs": len(members)}
        for key in AGGREGATED:
            values = [number(r[key]) for r in members if number(r[key]) is not None]
            finite = [v for v in values if not math.isinf(v)]
            if values and len(finite) < len(values):
                row[f"{key}_mean"], row[f"{key}_sd"] = math.inf, 0.0
            elif finite:
                mean = sum(finite) / len(finite)
                row[f"{key}_mean"] = mean
                row[f"{key}_sd"] = math.sqrt(sum((v - mean) ** 2 for v in finite) / max(len(finite) - 1, 1))
            else:
                row[f"{key}_mean"] = row[f"{key}_sd"] = None
        best = max(members, key=lambda r: number(r["val_dsc"]) if number(r["val_dsc"]) is not None else -1)
        row.update(best_run=best["training_input"], best_epsilon_valid=number(best["epsilon_valid"]),
                   best_epsilon_of_pick=pick_epsilon(members), best_chosen_among=len(members),
                   best_test_dsc=number(best["test_dsc"]), best_test2_dsc=number(best["test2_dsc"]))
        out.append(row)
    return out


def write_aggregate_csv(rows, path):
    columns = ["noise_multiplier", "dp_mode", "runs", *[f"{k}_{s}" for k in AGGREGATED for s in ("mean", "sd")],
               "best_run", "best_epsilon_valid", "best_epsilon_of_pick", "best_chosen_among", "best_test_dsc",
               "best_test2_dsc"]

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    return atomic_write(path, write)


def format_aggregate(rows):
    def ms(r, key, fmt):
        mean, sd = r[f"{key}_mean"], r[f"{key}_sd"]
        if mean is None:
            return "-"
        return "inf" if math.isinf(mean) else f"{fmt.format(mean)} ({fmt.format(sd)})"

    def eps(value):
        x = number(value)
        return "-" if value is None else str(value).split(":")[0] if x is None else "inf" if math.isinf(x) \
            else f"{x:.3g}"

    head = ["noise", "runs", "valid eps", "test DSC", "test2 DSC", "test bAHD", "MIA AUC", "best run (val)",
            "its eps alone", "eps of the pick", "its test DSC"]
    cells = [head] + [[f"{r['noise_multiplier']:g}", str(r["runs"]), ms(r, "epsilon_valid", "{:.3g}"),
                       ms(r, "test_dsc", "{:.3f}"), ms(r, "test2_dsc", "{:.3f}"), ms(r, "test_bahd", "{:.2f}"),
                       ms(r, "mia_auc", "{:.3f}"), r["best_run"], eps(r["best_epsilon_valid"]),
                       eps(r["best_epsilon_of_pick"]),
                       "-" if r["best_test_dsc"] is None else f"{r['best_test_dsc']:.3f}"] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    return "\n".join(["mean (SD) over seeds per noise multiplier", lines[0], "  ".join("-" * w for w in widths),
                      *lines[1:], "eps of the pick: the best run was chosen by looking at every run of its noise, so "
                      "its guarantee is theirs composed (Opacus RDP over their histories; sequential: the runs are "
                      "taken to have trained on the same patients); its eps alone does not hold for it"])


def plot_against_epsilon(rows, aggregate, path):
    """The paper's figures over seeds: DSC, bAHD, FID (train, test) and SSIM, mean and SD per noise multiplier, on
    a categorical epsilon axis (valid epsilon, non-private "inf" last); the real-data U-Net as a line; the paper's
    values (real patients) as open symbols where it reports them. A panel without data says why."""
    import matplotlib.pyplot as plt

    ordered = sorted(aggregate, key=lambda r: (math.inf if r["epsilon_valid_mean"] is None else
                                                r["epsilon_valid_mean"]))
    labels = [("inf" if r["epsilon_valid_mean"] is None or math.isinf(r["epsilon_valid_mean"]) else
               f"{r['epsilon_valid_mean']:.3g}") + f"\n(noise {r['noise_multiplier']:g})" for r in ordered]
    real = [r for r in rows if r["epsilon"] == "real data"]
    panels = [("DSC", ["test_dsc", "test2_dsc"]), ("bAHD (mm)", ["test_bahd", "test2_bahd"]),
              ("FID", ["fid_train", "fid_test"]), ("SSIM", ["ssim_generated"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), layout="constrained")
    for ax, (title, keys) in zip(axes, panels):
        drawn = False
        for k, key in enumerate(keys):
            points = [(i, r[f"{key}_mean"], r[f"{key}_sd"]) for i, r in enumerate(ordered)
                      if r[f"{key}_mean"] is not None]
            if points:
                x, y, sd = zip(*points)
                ax.errorbar([v + 0.08 * k for v in x], y, yerr=sd, fmt="o-", capsize=3, label=f"{key} (ours)")
                drawn = True
            for r in real:
                if number(r[key]) is not None:
                    ax.axhline(number(r[key]), ls="--", lw=1, color=f"C{k}", label=f"{key}: real-data U-Net")
            paper = PAPER_VALUES.get(key, {})
            # only the non-private point is comparable across data sets: our epsilons are not the paper's
            paper_x = [(i, paper["inf"]) for i, label in enumerate(labels)
                       if label.startswith("inf") and "inf" in paper]
            if drawn and paper_x:
                ax.plot(*zip(*paper_x), "s", mfc="none", color=f"C{k}", label=f"{key}: the paper (real patients)")
        if title == "FID" and not drawn:
            reason = next((str(r.get("fid_train")) for r in rows if isinstance(r.get("fid_train"), str)), "no data")
            ax.text(0.5, 0.5, "FID not computed:\n" + reason.split(":", 1)[-1].strip()[:60], ha="center",
                    va="center", wrap=True, transform=ax.transAxes, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        elif not drawn:
            ax.text(0.5, 0.5, "no synthetic set has this metric", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            ax.set_xticks(range(len(labels)), labels, fontsize=7)
            ax.legend(fontsize=6)
        ax.set_title(title)
        ax.set_xlabel("valid epsilon (categorical)")
    return save_figure(path, fig)


def compare(folder=None):
    """Collect, write summary.csv and the figure into the results folder; returns (rows, table text)."""
    folder = Path(folder or results_dir())
    rows = collect(folder)
    write_csv(rows, folder / "summary.csv")
    aggregate = aggregate_by_noise(rows)
    write_aggregate_csv(aggregate, folder / "summary_by_noise.csv")
    plot_against_epsilon(rows, aggregate, folder / "summary_vs_epsilon.png")
    return rows, format_table(rows) + ("\n\n" + format_aggregate(aggregate) if aggregate else "")
