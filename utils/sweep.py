"""The paper's grid (noise multipliers x seeds) as jobs through submitit: SLURM on a cluster, the local executor on
one machine. One job per (noise, seed) runs the steps in order, each skipped when its output is complete:

    run_gan (--resume when the trial exists) -> generate_samples -> audit_privacy -> run_unet -> eval_unet

A SLURM job that is preempted or reaches its time limit is requeued by submitit (SweepJob is Checkpointable) and
starts again at the first unfinished step; run_gan resumes from its last checkpoint, whose accountant history is
that of the released steps, so privacy is neither lost nor counted twice. The registry WORK_DIR/sweep/jobs.json
remembers which job runs which trial, so that a second identical command submits only what is unfinished.
"""

import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import config
from utils.audit import audit_paths
from utils.common import (
    PipelineError,
    gan_model_dir,
    gan_results_dir,
    load_json,
    result_paths,
    save_json,
    synthetic_name,
    synthetic_path,
    unet_dir,
)
from utils.locks import process_alive

ROOT = Path(__file__).resolve().parents[1]
ENV_KEYS = ("DPGAN_PRESET", "DPGAN_DATA_DIR", "DPGAN_WORK_DIR")


def sweep_dir():
    return config.WORK_DIR / "sweep"


def trial_name(noisem, seed):
    return f"noise{noisem:g}_seed{seed}"


def reference_flags(noisem, reference_lrd):
    """run_gan.py flags that only a non-private reference takes: its critic's learning rate (config.REFERENCE_LRD),
    after the shared flags so that it overrides theirs."""
    return ["--lrd", f"{reference_lrd:g}"] if math.isinf(noisem) and reference_lrd is not None else []


def set_epoch(epochs):
    """The generator epoch each job releases: the last trained one (a named epoch carries its own epsilon)."""
    return epochs - 1


def steps(trial, noisem, seed, epochs, gan_flags, thresh):
    """[(name, argv, done())] of one job, in order."""
    epoch = set_epoch(epochs)
    select = ["--trial", trial, "--epoch", str(epoch), "--thresh", str(thresh)]
    name = synthetic_name(trial, epoch, thresh)
    gan = ["run_gan.py", "--trial", trial, "--noisem", str(noisem), "--seed", str(seed), "--epochs", str(epochs),
           *gan_flags]
    from utils.unet import grid, run_name

    return [
        ("run_gan", gan, lambda: (gan_model_dir(trial) / f"epoch_{epoch}.pth").is_file()),
        ("generate_samples", ["generate_samples.py", *select], lambda: synthetic_path(trial, epoch, thresh).is_file()),
        ("audit_privacy", ["audit_privacy.py", *select], lambda: audit_paths(name)[0].is_file()),
        ("run_unet", ["run_unet.py", *select],
         lambda: all((unet_dir(name) / run_name(p) / "model.pt").is_file() for p in grid())),
        ("eval_unet", ["eval_unet.py", *select], lambda: result_paths(name)[1].is_file()),
    ]


class SweepJob:
    """One (noise, seed) of the grid: every unfinished step, as the scripts a user runs. Checkpointable: on
    preemption or timeout submitit resubmits the same call, which continues at the first unfinished step."""

    def __call__(self, trial, noisem, seed, epochs, gan_flags, thresh, env):
        os.environ.update(env)  # the submitting shell's preset and folders, on whatever node runs the job
        import importlib

        importlib.reload(config)
        for name, argv, done in steps(trial, noisem, seed, epochs, gan_flags, thresh):
            if done():
                print(f"[{trial}] {name}: done already", flush=True)
                continue
            if name == "run_gan" and gan_results_dir(trial).exists():
                argv = [*argv, "--resume"]
            print(f"[{trial}] {name}: {' '.join(argv)}", flush=True)
            start = time.time()
            subprocess.run([sys.executable, *argv], cwd=ROOT, check=True, env=os.environ.copy())
            print(f"[{trial}] {name}: finished in {time.time() - start:.0f} s", flush=True)
        return trial

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def slurm_parameters(args):
    """The submitit parameters of the SLURM executor for the sweep's flags."""
    params = {"timeout_min": int(args.time), "mem_gb": args.mem, "cpus_per_task": args.cpus_per_job,
              "gpus_per_node": args.gpus_per_job, "slurm_array_parallelism": args.max_parallel,
              "name": "dpgan_sweep", "slurm_signal_delay_s": 120}
    if args.partition:
        params["slurm_partition"] = args.partition
    return params


def default_executor():
    return "slurm" if shutil.which("sbatch") else "local"


def default_max_parallel(executor):
    """One job at a time on a CPU, one per visible GPU on a GPU machine (local); 40 (the whole grid) on SLURM."""
    if executor == "slurm":
        return 40
    import torch

    return max(1, torch.cuda.device_count())


def make_executor(args):
    import submitit

    executor = submitit.AutoExecutor(folder=sweep_dir() / "logs" / "%j", cluster=args.executor)
    if args.executor == "slurm":
        executor.update_parameters(**slurm_parameters(args))
    else:
        executor.update_parameters(timeout_min=int(args.time), name="dpgan_sweep")
    return executor


# ---- the registry and the status table ----
def registry_path():
    return sweep_dir() / "jobs.json"


def read_registry():
    path = registry_path()
    return load_json(path, "sweep registry") if path.is_file() else {}


def job_of(entry):
    """The submitit job of a registry entry (its state read from SLURM or from the local result files)."""
    import submitit

    folder = sweep_dir() / "logs" / "%j"
    job_class = submitit.SlurmJob if entry["executor"] == "slurm" else submitit.LocalJob
    return job_class(folder=folder, job_id=entry["job_id"])


def local_job_running(entry, job):
    """Whether a local job's controller still runs. submitit knows its process only in the command that started it,
    so `--status` from another shell asks the operating system: a local job's id is its controller's pid, and a pid
    counts only on the host that recorded it, without a result (submitit writes one when the job ends, failed or
    not) and, where /proc shows it, running submitit's controller on this sweep's log folder (a pid reused by
    another process, or a zombie, does not)."""
    if entry["executor"] != "local" or entry.get("host") != socket.gethostname():
        return False
    pid = int(entry["job_id"]) if str(entry["job_id"]).isdigit() else 0
    if pid <= 0 or not process_alive(pid) or job.paths.result_pickle.exists():
        return False
    if not Path("/proc").is_dir():  # macOS: the pid and the missing result are all there is to ask
        return True
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:  # gone since
        return False
    return "submitit.local._local" in argv and any(str(sweep_dir() / "logs") in a for a in argv)


def trial_state(trial, entry, thresh, epochs):
    """(state, detail): done / running / pending / failed (detail: the log) / not submitted."""
    name = synthetic_name(trial, set_epoch(epochs), thresh)
    if result_paths(name)[1].is_file():
        return "done", ""
    if entry is None:
        return "not submitted", ""
    job = job_of(entry)
    if local_job_running(entry, job):
        return "running", ""
    state = job.state.upper()
    if entry["executor"] == "slurm" and state in ("PENDING", "REQUEUED", "CONFIGURING"):
        return "pending", ""
    if state in ("RUNNING", "COMPLETING"):
        return "running", ""
    return "failed", f"log: {job.paths.stderr}"


def trial_figures(trial, thresh, epochs):
    """(valid epsilon reached so far, test DSC) of a trial, from its GAN log and result file."""
    from utils.gan_log import read_log

    log = read_log(gan_results_dir(trial) / "log.csv")
    epsilon = log[-1]["epsilon_valid"] if log else None
    result_json = result_paths(synthetic_name(trial, set_epoch(epochs), thresh))[1]
    dsc = load_json(result_json, "result file").get("test_dsc", {}).get("mean") if result_json.is_file() else None
    return epsilon, dsc


def status_rows(grid_points, thresh, epochs):
    registry = read_registry()
    rows = []
    for noisem, seed in grid_points:
        trial = trial_name(noisem, seed)
        state, detail = trial_state(trial, registry.get(trial), thresh, epochs)
        epsilon, dsc = trial_figures(trial, thresh, epochs)
        rows.append({"job": trial, "noisem": noisem, "seed": seed, "state": state, "detail": detail,
                     "epsilon": epsilon, "test_dsc": dsc})
    return rows


def format_status(rows):
    def number(value, fmt):
        if value is None:
            return "-"
        return "inf" if math.isinf(value) else fmt.format(value)

    lines = [f"{'job':<22} {'state':<14} {'valid eps':>9} {'test DSC':>8}  log"]
    for r in rows:
        lines.append(f"{r['job']:<22} {r['state']:<14} {number(r['epsilon'], '{:.3g}'):>9} "
                     f"{number(r['test_dsc'], '{:.3f}'):>8}  {r['detail']}")
    return "\n".join(lines)


def submit(args, gan_flags):
    """Submit every unfinished (noise, seed) that no job is running; local: run them, max_parallel at a time.
    Returns the submitted trials."""
    grid_points = [(n, s) for n in args.noisem for s in args.seeds]
    registry = read_registry()
    todo = []
    for noisem, seed in grid_points:
        trial = trial_name(noisem, seed)
        state, _ = trial_state(trial, registry.get(trial), args.thresh, args.epochs)
        if state in ("done", "running", "pending"):
            continue
        todo.append((trial, noisem, seed))
    if not todo:
        return []
    env = {k: str(os.environ[k]) for k in ENV_KEYS if k in os.environ}
    env.setdefault("DPGAN_WORK_DIR", str(config.WORK_DIR.resolve()))
    env.setdefault("DPGAN_DATA_DIR", str(config.DATA_DIR.resolve()))
    env.setdefault("DPGAN_PRESET", config.PRESET)
    if args.executor != "slurm" and "OMP_NUM_THREADS" not in os.environ:
        # jobs side by side on one machine share its cores: more threads than cores only spin
        threads = str(max(1, (os.cpu_count() or 1) // args.max_parallel))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    executor = make_executor(args)
    waves = [todo] if args.executor == "slurm" else [todo[i:i + args.max_parallel]
                                                     for i in range(0, len(todo), args.max_parallel)]
    for wave in waves:
        jobs = []
        with executor.batch():
            for trial, noisem, seed in wave:
                flags = [*gan_flags, *reference_flags(noisem, args.reference_lrd)]
                jobs.append(executor.submit(SweepJob(), trial, noisem, seed, args.epochs, flags, args.thresh, env))
        for (trial, noisem, seed), job in zip(wave, jobs):
            registry[trial] = {"job_id": job.job_id, "executor": args.executor, "host": socket.gethostname(),
                               "noisem": noisem, "seed": seed}
            print(f"submitted {trial}: job {job.job_id} ({args.executor})", flush=True)
        save_json(registry_path(), registry)
        if args.executor != "slurm":
            for job in jobs:
                job.exception()  # waits; a failure is reported by the status table with its log
    return [t for t, _, _ in todo]


def check_flags(args):
    if not args.noisem or not args.seeds:
        raise PipelineError("--noisem and --seeds need at least one value each")
    if args.executor not in ("slurm", "local", "debug"):
        raise PipelineError(f"--executor {args.executor!r}: choose slurm or local")
    if args.max_parallel < 1:
        raise PipelineError(f"--max_parallel {args.max_parallel}: must be at least 1")
    if args.epochs < 1:
        raise PipelineError(f"--epochs {args.epochs}: must be at least 1")
    if args.reference_lrd is not None and not args.reference_lrd > 0:
        raise PipelineError(f"--reference_lrd {args.reference_lrd}: a learning rate must be > 0")
