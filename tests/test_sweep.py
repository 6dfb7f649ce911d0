"""sweep.py over utils/sweep.py: the grid through submitit's local executor (tiny preset), and the SLURM parameters."""

import csv
import json
import os
import stat

import pytest

import run_gan
import sweep
from utils import sweep as sweep_module
from utils.common import gan_results_dir
from utils.compare import results_dir
from utils.gan_checkpoints import checkpoint_path, load_checkpoint
from utils.privacy import epsilon_from_history

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing", "ignore:Secure RNG turned off")


@pytest.fixture
def phantoms(phantom_dirs, monkeypatch):
    """The phantoms and their training patches in this test's folders, which the jobs' scripts are pointed at."""
    data, work, env = phantom_dirs
    for key in ("DPGAN_PRESET", "DPGAN_DATA_DIR", "DPGAN_WORK_DIR"):
        monkeypatch.setenv(key, env[key])
    return work


def test_grid_runs_to_the_summary_resumes_a_killed_trial_and_a_second_run_submits_nothing(phantoms, capsys):
    # noise 2, seed 1 was killed after its first epoch: the job must resume it, not start again or count twice
    run_gan.main(["--trial", "noise2_seed1", "--noisem", "2.0", "--seed", "1", "--epochs", "1"])
    # one noise, two seeds: the smallest grid with a pick among runs (every job is five scripts, each a new process)
    grid = ["--executor", "local", "--noisem", "2", "--seeds", "1", "2", "--epochs", "2", "--max_parallel", "2"]
    rows = sweep.main(grid)
    assert [r["state"] for r in rows] == ["done"] * 2, sweep_module.format_status(rows)
    assert all(0 <= r["test_dsc"] <= 1 for r in rows)
    import socket

    registry = json.loads((phantoms / "sweep" / "jobs.json").read_text())
    assert {e["host"] for e in registry.values()} == {socket.gethostname()}  # what --status elsewhere asks
    assert rows[0]["epsilon"] == rows[1]["epsilon"] > 0  # same noise, same accounting
    steps = [sum(h[2] for h in load_checkpoint(checkpoint_path(f"noise2_seed{s}", 1))["accountant"]["history"])
             for s in (1, 2)]
    assert steps[0] == steps[1] > 0  # the resumed trial counted exactly what the uninterrupted one did
    logged = [int(r["epoch"]) for r in _log(gan_results_dir("noise2_seed1"))]
    assert logged == [0, 1]

    capsys.readouterr()
    sweep.main(grid)
    out = capsys.readouterr().out
    assert "0 job(s) submitted" in out and out.count(" done ") >= 2

    import compare_results

    compare_results.main([])
    assert "mean (SD) over seeds per noise multiplier" in capsys.readouterr().out
    # the summary's best run of noise 2 was picked among both seeds: it carries their composed epsilon
    with open(results_dir() / "summary_by_noise.csv") as f:
        noise2 = next(r for r in csv.DictReader(f) if r["noise_multiplier"] == "2.0")
    accountants = [load_checkpoint(checkpoint_path(f"noise2_seed{s}", 1))["accountant"] for s in (1, 2)]
    both = epsilon_from_history([tuple(h) for a in accountants for h in a["history"]], accountants[0]["delta"])
    assert float(noise2["best_epsilon_of_pick"]) == pytest.approx(both) and both > float(noise2["best_epsilon_valid"])


def _log(folder):
    with open(folder / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_failing_job_is_reported_with_its_log_and_status_submits_nothing(phantoms, capsys):
    rows = sweep.main(["--executor", "local", "--noisem", "0", "--seeds", "1", "--epochs", "1"])
    assert rows[0]["state"] == "failed" and rows[0]["detail"].startswith("log: ")
    log = rows[0]["detail"].removeprefix("log: ")
    assert os.path.isfile(log) and "the noise multiplier must be > 0" in open(log).read()
    registry = json.loads((phantoms / "sweep" / "jobs.json").read_text())
    capsys.readouterr()
    sweep.main(["--executor", "local", "--noisem", "0", "--seeds", "1", "--epochs", "1", "--status"])
    assert "failed" in capsys.readouterr().out
    assert json.loads((phantoms / "sweep" / "jobs.json").read_text()) == registry  # --status submitted nothing


def test_slurm_executor_gets_the_partition_gpus_time_memory_and_array_parallelism(dirs, tmp_path, monkeypatch):
    for tool in ("srun", "sbatch", "sacct", "scancel"):  # a cluster's commands, so that submitit builds its executor
        path = tmp_path / "bin" / tool
        path.parent.mkdir(exist_ok=True)
        path.write_text("#!/bin/sh\nexit 0\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    args, gan_flags = sweep.parse_args(["--partition", "gpu", "--time", "600", "--mem", "48", "--gpus_per_job", "1",
                                        "--cpus_per_job", "6", "--max_parallel", "8", "--loss", "ns"])
    assert args.executor == "slurm" and gan_flags == ["--loss", "ns"]  # unknown flags go to run_gan.py
    executor = sweep_module.make_executor(args)
    script = executor._executor._make_submission_file_text("python -m x", "%j")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=600", "#SBATCH --mem=48GB", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --cpus-per-task=6", "#SBATCH --signal=USR2@120"):
        assert line in script, line
    assert executor._executor.parameters.get("array_parallelism", 8) == 8
    assert isinstance(sweep_module.SweepJob().checkpoint("t", 1.0, 1, 2, [], 0.8, {}).function,
                      sweep_module.SweepJob)  # requeued with the same call, which resumes


def test_bad_flags_are_refused(dirs, capsys):
    with pytest.raises(SystemExit):
        sweep.main(["--executor", "cloud", "--noisem", "1", "--seeds", "1"])
    assert "--executor 'cloud'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.main(["--executor", "local", "--noisem", "inf", "--seeds", "1", "--reference_lrd", "0"])
    assert "--reference_lrd 0.0" in capsys.readouterr().err


def test_only_the_non_private_jobs_take_the_reference_critic_learning_rate(dirs, monkeypatch):
    """--reference_lrd (default config.REFERENCE_LRD) reaches run_gan.py of the noise-inf jobs and no other; each
    job's own run_gan.py flags are what submit hands it (the jobs' work is replaced by a record of their calls)."""
    calls = {}
    monkeypatch.setattr(sweep_module.SweepJob, "__call__",
                        lambda self, trial, noisem, seed, epochs, gan_flags, thresh, env: calls.update(
                            {trial: run_gan.parse_args(["--trial", trial, *gan_flags])}))
    monkeypatch.setattr(sweep_module.config, "REFERENCE_LRD", 2e-5)
    args, gan_flags = sweep.parse_args(["--executor", "debug", "--noisem", "inf", "0.5", "--seeds", "1", "--epochs",
                                        "1", "--lrd", "3e-4", "--batch_size", "16"])
    assert sweep_module.submit(args, gan_flags) == ["noiseinf_seed1", "noise0.5_seed1"]
    assert calls["noiseinf_seed1"].lrd == 2e-5 and calls["noise0.5_seed1"].lrd == 3e-4
    assert calls["noiseinf_seed1"].batch_size == calls["noise0.5_seed1"].batch_size == 16
    monkeypatch.setattr(sweep_module.config, "REFERENCE_LRD", None)  # the paper preset's: every job at --lrd
    assert sweep_module.reference_flags(float("inf"), sweep.parse_args([])[0].reference_lrd) == []


def test_the_laptop_curve_preset_builds_on_the_demo_and_its_noise_meets_epsilon_10_5_2():
    import subprocess
    import sys

    # every job trains the demo's fine-tuning on the patients (demo.py --curve): its epochs at its batch
    code = ("import json, config, demo; from utils import privacy\n"
            "n = config.N_PATIENTS['train'] * config.PATCHES_PER_PATIENT\n"
            "eps = [privacy.gan_privacy(s, demo.PRIVATE_EPOCHS, demo.FINETUNE_BATCH, n, config.N_DISCR)\n"
            "       ['epsilon_valid'] for s in config.NOISE_MULTIPLIERS[1:]]\n"
            "print(json.dumps({'arch': config.ARCH, 'patch': config.PATCH_SIZE, 'seeds': list(config.GAN_SEEDS),\n"
            "                  'eps': eps, 'first': str(config.NOISE_MULTIPLIERS[0])}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=sweep_module.ROOT, capture_output=True, text=True,
                         check=True, env=dict(os.environ, DPGAN_PRESET="curve")).stdout
    curve = json.loads(out.splitlines()[-1])
    assert curve["arch"] == "dcgan" and curve["patch"] == 64 and len(curve["seeds"]) == 2  # the demo's scale
    assert curve["first"] == "inf"
    assert all(0.85 * t < e <= t for e, t in zip(curve["eps"], (10, 5, 2), strict=True)), curve["eps"]


def test_a_second_sweep_command_is_refused_while_one_submits(dirs, capsys, monkeypatch):
    import socket

    from utils.locks import lock_path

    lock = lock_path(sweep_module.sweep_dir())
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "now"}))
    monkeypatch.setattr(sweep, "submit", lambda *a: pytest.fail("submitted beside a running sweep"))
    with pytest.raises(SystemExit):
        sweep.main(["--executor", "local", "--noisem", "1", "--seeds", "1", "--epochs", "1"])
    assert "the sweep is in use by process" in capsys.readouterr().err


def test_status_from_another_shell_reads_a_running_local_job_as_running_and_a_reused_pid_as_not(dirs):
    import socket
    import subprocess
    import sys

    logs = sweep_module.sweep_dir() / "logs"
    status = ["--executor", "local", "--noisem", "1", "--seeds", "1", "--epochs", "1", "--status"]
    controller = ["submitit.local._local", str(logs / "%j")]  # the argv of submitit's local controller

    def state_of(argv, ended=False):
        """The status of trial noise1_seed1 whose registered local job is a live process run with argv (ended:
        with the result file submitit writes when a job ends)."""
        process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *argv])
        try:
            registry = {"noise1_seed1": {"job_id": str(process.pid), "executor": "local",
                                         "host": socket.gethostname(), "noisem": 1.0, "seed": 1}}
            sweep_module.registry_path().parent.mkdir(parents=True, exist_ok=True)
            sweep_module.registry_path().write_text(json.dumps(registry))
            if ended:
                result = sweep_module.job_of(registry["noise1_seed1"]).paths.result_pickle
                result.parent.mkdir(parents=True, exist_ok=True)
                result.write_bytes(b"")
            return sweep.main(status)[0]["state"]
        finally:
            process.kill()
            process.wait()

    assert state_of(controller) == "running"
    assert sweep.main(status)[0]["state"] == "failed"  # its process gone without a result
    assert state_of(["some", "other", "program"]) == "failed"  # its pid reused by another process
    assert state_of(controller, ended=True) != "running"  # a job that ended, its controller not yet reaped
