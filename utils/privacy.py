"""Privacy accounting of the DP-WGAN, always through Opacus's accountants.

RDP (`opacus.accountants.RDPAccountant`) is the paper's accountant and the default; PRV
(`opacus.accountants.PRVAccountant`, Gopi et al. 2021) computes the privacy loss distribution numerically and
gives a tighter epsilon for the same history (its upper estimate is reported). Both are shown side by side.

Two mechanisms (docs/method.md, "Strict and paper accounting"):
- strict: every critic iteration draws a fresh Poisson batch (rate q = batch / N) and takes one clipped,
  noised step on it: epochs x steps_per_epoch x n_discr subsampled Gaussian steps with noise sigma.
- paper: the authors' loop reuses one Poisson batch for the n_discr critic iterations of a generator update
  and takes two noisy optimizer steps per iteration (real batch, fake batch). The authors counted
  2 x n_discr independent subsampled Gaussian steps per generator update ("epsilon", the paper's number).
  That is not a valid bound: the fake step costs nothing, but n_discr noisy releases of one subsample
  compose to a single subsampled Gaussian with noise sigma / sqrt(n_discr) per generator update
  ("epsilon_valid").

Command line: python -m utils.privacy --noisem 0.65 --epochs 29 --batch_size 32 --n_samples 41000 \
    --n_discr 5 --dp_mode paper   (or --target_epsilon T [--accountant prv] instead of --noisem)
"""

import argparse
import functools
import json
import math

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

import config

DP_MODES = ("strict", "paper")
ACCOUNTANTS = ("rdp", "prv")
PRV_EPS_ERROR = 0.01  # PRV's numerical error on epsilon; its upper estimate is what is reported
# Opacus's PRV accountant discretises the privacy loss on a grid whose size grows with the epsilon and the square root
# of the steps. Measured on 2 cores: 4.5 million points (the paper's 64,050 updates) 3.7 s and 0.9 GB; 17 million
# points 48 s and 2.9 GB; 400 million (--target_epsilon 1000) or 8 billion (10,000 epochs) never return. Beyond this
# many points the calculator gives the RDP epsilon alone and says why.
PRV_MAX_POINTS = 10_000_000


def steps_per_epoch(n_samples, batch_size):
    """Generator updates per epoch: round(N / batch), as the authors did."""
    return max(1, round(n_samples / batch_size))


def epsilon_from_history(history, delta, accountant="rdp"):
    """Epsilon at delta of an accountant history [(noise_multiplier, sample_rate, steps), ...], by Opacus's RDP
    (the paper's orders) or PRV accountant (its upper estimate)."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"--accountant {accountant!r}: choose one of {', '.join(ACCOUNTANTS)}")
    if not history:
        return 0.0
    if any(math.isinf(sigma) for sigma, _, _ in history):
        raise ValueError("an infinite noise multiplier is a non-private run; it has no accountant history")
    if accountant == "rdp":
        rdp = RDPAccountant()
        rdp.history = [tuple(h) for h in history]
        return rdp.get_epsilon(delta=delta, alphas=config.DP_ORDERS)
    prv = PRVAccountant()
    prv.history = [tuple(h) for h in history]
    return prv.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR)


def prv_grid_points(history, delta):
    """The number of points of the grid on which Opacus's PRV accountant would discretise `history` at `delta`, by
    its own rule (PRVAccountant._get_domain with get_epsilon's default delta error), from RDP bounds in milliseconds."""
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size

    delta_error = delta / 1000
    steps = [h[2] for h in history]
    half_width = compute_safe_domain_size([PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in history], steps,
                                          PRV_EPS_ERROR, delta_error)
    mesh = PRV_EPS_ERROR / math.sqrt(sum(steps) * math.log(12 / delta_error) / 2)
    return 2 * half_width / mesh


def prv_out_of_reach(history, delta):
    """Why Opacus's PRV accountant cannot give `history`'s epsilon in reasonable time and memory, or None."""
    points = prv_grid_points(history, delta) if history else 0
    if points <= PRV_MAX_POINTS:
        return None
    return (f"not computed: Opacus's PRV accountant would discretise this history on {points:.2g} points ("
            f"{points * 8 / 2 ** 30:.2g} GiB per array; it takes minutes from {PRV_MAX_POINTS:.0e} points on); "
            f"the RDP epsilon is a valid bound")


def strict_history(noise_multiplier, sample_rate, generator_updates, n_discr):
    return [(noise_multiplier, sample_rate, generator_updates * n_discr)]


def paper_reported_history(noise_multiplier, sample_rate, generator_updates, n_discr):
    """What the authors' accountant counted: two noisy steps (real, fake) per critic iteration."""
    return [(noise_multiplier, sample_rate, 2 * generator_updates * n_discr)]


def valid_paper_history(noise_multiplier, sample_rate, generator_updates, n_discr):
    """A valid bound for the authors' loop: one subsampled Gaussian, sigma / sqrt(n_discr), per update."""
    return [(noise_multiplier / math.sqrt(n_discr), sample_rate, generator_updates)]


def check_settings(noisem=None, batch_size=None, n_samples=None, n_discr=None, dp_mode=None, delta=None,
                   epochs=None):
    """Raise ValueError naming the flag for settings no mechanism can run with."""
    if noisem is not None and not noisem > 0:
        raise ValueError(f"--noisem {noisem}: the noise multiplier must be > 0 (inf for a non-private run)")
    if n_samples is not None and n_samples < 1:
        raise ValueError(f"--n_samples {n_samples}: there must be at least one training patch")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch_size {batch_size}: must be at least 1")
    if batch_size is not None and n_samples is not None and batch_size > n_samples:
        raise ValueError(f"--batch_size {batch_size} is larger than the {n_samples} training patches")
    if n_discr is not None and n_discr < 1:
        raise ValueError(f"--n_discr {n_discr}: must be at least 1")
    if dp_mode is not None and dp_mode not in DP_MODES:
        raise ValueError(f"--dp_mode {dp_mode!r}: choose one of {', '.join(DP_MODES)}")
    if delta is not None and not 0 < delta < 1:
        raise ValueError(f"--delta {delta}: must lie in (0, 1)")
    if epochs is not None and epochs < 0:
        raise ValueError(f"--epochs {epochs}: must be >= 0")


def guarantee(counted, delta, dp_mode="strict", noise_multiplier=math.inf, sample_rate=None, generator_updates=0,
              n_discr=None, group_size=None, prv=True):
    """Every epsilon the project prints for one run (or a pick among runs), from its accountant history: the one
    place that turns a history into guarantees. The trial's progress and log, the calculator, the release, the
    comparison and the audit all call it.

    counted: the history [(noise multiplier, sample rate, steps), ...] as the run's DP optimizer counted it; None for
    a non-private run (noise inf: every epsilon inf). dp_mode "paper": the counted history is the paper's number,
    not a valid bound; the valid one is rebuilt from noise_multiplier, sample_rate, generator_updates and n_discr
    (valid_paper_history). group_size: the most patches one patient contributes (1 for patient-level DP), for the
    per-patient statement. prv: True, also the PRV epsilon (a run's record: always computed, however long it takes);
    "in_reach", the PRV epsilon unless Opacus's PRV accountant is out of reach for the history (the calculator's
    plans: then None and a note, prv_out_of_reach); False, none.

    Returns epsilon (as counted), epsilon_valid (RDP), epsilon_valid_prv (and epsilon_valid_prv_note), steps_counted,
    steps_valid, history (the valid history, which a pick among runs composes) and, with group_size, per_patient."""
    if counted is None:
        result = {"epsilon": math.inf, "epsilon_valid": math.inf, "epsilon_valid_prv": math.inf, "steps_counted": 0,
                  "steps_valid": 0, "history": []}
    else:
        counted = [tuple(h) for h in counted]
        if dp_mode != "strict" and n_discr is None:
            raise ValueError("paper mode's valid bound needs the run's n_discr (critic iterations per update)")
        valid = counted if dp_mode == "strict" else valid_paper_history(noise_multiplier, sample_rate,
                                                                         generator_updates, n_discr)
        epsilon = epsilon_from_history(counted, delta)
        result = {"epsilon": epsilon, "epsilon_valid": epsilon if valid is counted else
                  epsilon_from_history(valid, delta), "steps_counted": sum(h[2] for h in counted),
                  "steps_valid": sum(h[2] for h in valid), "history": [list(h) for h in valid]}
        if prv:
            skipped = prv_out_of_reach(valid, delta) if prv == "in_reach" else None
            result["epsilon_valid_prv"] = None if skipped else epsilon_from_history(valid, delta, "prv")
            if skipped:
                result["epsilon_valid_prv_note"] = skipped
    if group_size is not None:
        result["per_patient"] = group_privacy(result["epsilon_valid"], delta, group_size)
    return result


def gan_privacy(noisem, epochs, batch_size, n_samples, n_discr, dp_mode="strict", delta=None,
                patches_per_patient=None):
    """The (epsilon, delta) guarantee of a DP-WGAN run planned with these settings, per patch and per patient
    (the calculator: `python -m utils.privacy`).

    epsilon: as the run's accountant counts it (for paper mode the paper's number, not a valid bound);
    epsilon_valid: a valid RDP bound; epsilon_valid_prv: the same history through the PRV accountant.
    epochs may be fractional (a run stopped mid-epoch is described by its generator updates).
    """
    check_settings(noisem, batch_size, n_samples, n_discr, dp_mode, delta, epochs)
    delta = delta if delta is not None else 1.0 / n_samples
    sample_rate = batch_size / n_samples
    updates = round(epochs * steps_per_epoch(n_samples, batch_size))
    counted = None if math.isinf(noisem) else (strict_history if dp_mode == "strict" else paper_reported_history)(
        noisem, sample_rate, updates, n_discr)
    result = guarantee(counted, delta, dp_mode, noisem, sample_rate, updates, n_discr,
                       group_size=patches_per_patient or config.PATCHES_PER_PATIENT, prv="in_reach")
    return {"noise_multiplier": noisem, "dp_mode": dp_mode, "epochs": epochs, "batch_size": batch_size,
            "n_samples": n_samples, "n_discr": n_discr, "sample_rate": sample_rate, "delta": delta,
            "generator_updates": updates, "epsilon": result["epsilon"], "epsilon_valid": result["epsilon_valid"],
            "epsilon_valid_prv": result["epsilon_valid_prv"], "steps": result["steps_counted"],
            **{k: result[k] for k in ("epsilon_valid_prv_note", "per_patient") if k in result}}


def noise_for_target_epsilon(target_epsilon, epochs, batch_size, n_samples, n_discr, dp_mode="strict",
                             delta=None, accountant="rdp"):
    """The noise multiplier whose VALID epsilon (by `accountant`) reaches target_epsilon (Opacus's search)."""
    check_settings(None, batch_size, n_samples, n_discr, dp_mode, delta, epochs)
    if not target_epsilon > 0:
        raise ValueError(f"--target_epsilon {target_epsilon}: must be > 0")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"--accountant {accountant!r}: choose one of {', '.join(ACCOUNTANTS)}")
    delta = delta if delta is not None else 1.0 / n_samples
    updates = round(epochs * steps_per_epoch(n_samples, batch_size))
    # strict: n_discr steps of sigma per update; paper (valid): one step of sigma / sqrt(n_discr) per update.
    steps, scale = (updates * n_discr, 1.0) if dp_mode == "strict" else (updates, math.sqrt(n_discr))
    options = {"alphas": config.DP_ORDERS} if accountant == "rdp" else {"eps_error": PRV_EPS_ERROR}
    search = functools.partial(get_noise_multiplier, target_epsilon=target_epsilon, target_delta=delta,
                               sample_rate=batch_size / n_samples, steps=steps, epsilon_tolerance=0.005)
    sigma = search(accountant="rdp", alphas=config.DP_ORDERS)
    if accountant == "prv":  # its sigma lies below RDP's: the search's grids are at least as large as this one
        out_of_reach = prv_out_of_reach([(sigma, batch_size / n_samples, steps)], delta)
        if out_of_reach:
            raise ValueError(f"--accountant prv --target_epsilon {target_epsilon}: {out_of_reach.split(': ', 1)[1]}; "
                             f"search with --accountant rdp")
        sigma = search(accountant="prv", **options)
    return sigma * scale


def group_privacy(epsilon, delta, group_size):
    """(epsilon, delta)-DP for one sample gives (k eps, k e^((k-1) eps) delta) for a group of k samples.

    A patient contributes group_size patches, so this is what the per-patch guarantee says about one
    patient. It is usually vacuous (delta >= 1): the per-patch epsilon does not protect a whole patient.
    """
    k = int(group_size)
    if math.isinf(epsilon):
        return {"group_size": k, "epsilon": math.inf, "delta": 1.0, "meaningful": False}
    log_delta = math.log(k) + (k - 1) * epsilon + math.log(delta)
    group_delta = 1.0 if log_delta >= 0 else math.exp(log_delta)
    return {"group_size": k, "epsilon": k * epsilon, "delta": group_delta, "meaningful": group_delta < 1.0}


def critic_parameters(ndf):
    """The number of parameters of the critic of width ndf (the d of the noise norm sigma C sqrt(d))."""
    from model import Discriminator

    return sum(p.numel() for p in Discriminator(ndf).parameters())


def noise_to_signal(noise_multiplier, n_parameters, batch_units):
    """Norm of the noise over the largest clipped signal of one step: sigma C sqrt(d) / (B C)."""
    return noise_multiplier * math.sqrt(n_parameters) / batch_units


PATIENT_TABLE = {"patients": (41, 200, 1000), "epsilons": (1, 4, 10), "iterations": (1000, 10_000)}


def patient_cost_rows(batch_fraction=0.25, ndf=16, n_discr=None):
    """Rows of the patient-level cost table (docs/patient-level-dp.md, "What it costs"): for every (patients P,
    critic iterations, epsilon), the noise multiplier for a valid patient-level epsilon at delta 1/P with
    b = round(batch_fraction P) patients per iteration, and the noise-to-signal ratio per step for the critic of
    width ndf; the patch-level figure (41,000 patches, batch 32) beside it."""
    n_discr = n_discr or config.N_DISCR
    d = critic_parameters(ndf)
    rows = []
    for n_units, batch, unit in [(41_000, 32, "patch")] + [(p, max(1, round(batch_fraction * p)), "patient")
                                                          for p in PATIENT_TABLE["patients"]]:
        for iterations in PATIENT_TABLE["iterations"]:
            epochs = iterations / (n_discr * steps_per_epoch(n_units, batch))
            for target in PATIENT_TABLE["epsilons"]:
                sigma = noise_for_target_epsilon(target, epochs, batch, n_units, n_discr)
                rows.append({"unit": unit, "units": n_units, "batch": batch, "iterations": iterations,
                             "epsilon": target, "noise_multiplier": sigma,
                             "noise_to_signal": noise_to_signal(sigma, d, batch)})
    return rows, d


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m utils.privacy", description=__doc__.split("\n\n")[0],
                                epilog="Patient-level privacy: --privacy_unit patient --n_patients P --batch_patients "
                                       "b; an epoch is then round(P / b) generator updates (as round(N / batch) "
                                       "for patches), each of n_discr critic iterations.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--noisem", type=float, help="noise multiplier (inf: non-private)")
    which.add_argument("--target_epsilon", type=float, help="find the noise multiplier reaching this valid epsilon")
    which.add_argument("--patient_cost_table", action="store_true",
                       help="print the table of docs/patient-level-dp.md: noise and noise-to-signal for "
                            "patient-level epsilon 1, 4, 10")
    p.add_argument("--epochs", type=float, default=config.EPOCHS)
    p.add_argument("--batch_size", type=int, default=config.BATCH_SIZE)
    p.add_argument("--n_samples", type=int, default=config.N_PATIENTS["train"] * config.PATCHES_PER_PATIENT)
    p.add_argument("--n_discr", type=int, default=config.N_DISCR)
    p.add_argument("--dp_mode", default=config.DP_MODE, choices=DP_MODES)
    p.add_argument("--delta", type=float, default=config.DELTA, help="default: 1 / n_samples")
    p.add_argument("--patches_per_patient", type=int, default=config.PATCHES_PER_PATIENT)
    p.add_argument("--privacy_unit", default="patch", choices=("patch", "patient"),
                   help="patient: account at rate batch_patients / n_patients (run_gan.py --privacy_unit patient)")
    p.add_argument("--n_patients", type=int, default=config.N_PATIENTS["train"])
    p.add_argument("--batch_patients", type=int, default=config.BATCH_PATIENTS)
    p.add_argument("--accountant", default="rdp", choices=ACCOUNTANTS,
                   help="accountant of the --target_epsilon search (default rdp, the paper's); both are printed")
    args = p.parse_args(argv)
    if args.patient_cost_table:
        return print_patient_cost_table()
    # Patient-level accounting is the same subsampled Gaussian over patients instead of patches.
    patient = args.privacy_unit == "patient"
    units, batch = (args.n_patients, args.batch_patients) if patient else (args.n_samples, args.batch_size)
    try:
        if patient and not 1 <= args.batch_patients <= args.n_patients:
            raise ValueError(f"--batch_patients {args.batch_patients}: must lie between 1 and --n_patients "
                             f"{args.n_patients}")
        noisem = args.noisem
        if args.target_epsilon is not None:
            noisem = noise_for_target_epsilon(args.target_epsilon, args.epochs, batch, units, args.n_discr,
                                              args.dp_mode, args.delta, args.accountant)
        result = gan_privacy(noisem, args.epochs, batch, units, args.n_discr, args.dp_mode, args.delta,
                             1 if patient else args.patches_per_patient)
    except ValueError as err:
        p.error(str(err))
    result["privacy_unit"] = args.privacy_unit
    if patient:
        result["n_patients"], result["batch_patients"] = result.pop("n_samples"), result.pop("batch_size")
    if args.target_epsilon is not None:
        result.update(target_epsilon=args.target_epsilon, target_accountant=args.accountant)
    print(json.dumps(result, indent=2))
    return result


def print_patient_cost_table():
    rows, d = patient_cost_rows()
    print(f"| unit | units | batch | critic iterations | epsilon | noise multiplier | noise / signal (d = {d:,}) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['unit']} | {r['units']:,} | {r['batch']} | {r['iterations']:,} | {r['epsilon']} | "
              f"{r['noise_multiplier']:.3g} | {r['noise_to_signal']:.3g} |")
    return rows


if __name__ == "__main__":
    main()
