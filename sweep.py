"""The paper's grid on a cluster: one job per (noise multiplier, seed) through submitit (SLURM) or on this machine.

    python sweep.py                                   # config.NOISE_MULTIPLIERS x config.GAN_SEEDS, 40 jobs
    python sweep.py --noisem inf 2 1 --seeds 12 13 --executor local --epochs 10
    python sweep.py --status                          # the table, nothing submitted

Each job runs run_gan (resuming a trial that exists) -> generate_samples -> audit_privacy -> run_unet ->
eval_unet for trial noise<noisem>_seed<seed>, skipping every step whose output is complete. Flags this script
does not know (e.g. --loss ns --arch dcgan) are passed to run_gan.py. SLURM: submitit's AutoExecutor, a job array
of at most --max_parallel running jobs; a preempted or timed-out job is requeued and resumes from its last
checkpoint. Local: at most --max_parallel jobs at once, and the command returns when they are done. Running the
same command again submits only what is unfinished; it ends with a table of job, state (done, running,
pending, failed with the path of its log), valid epsilon reached and test DSC, and compare_results.py draws the
grid's figures over seeds.
"""

import argparse

import config
from utils.common import print_setup, script_main
from utils.locks import owned
from utils.sweep import (
    check_flags,
    default_executor,
    default_max_parallel,
    format_status,
    status_rows,
    submit,
    sweep_dir,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--noisem", type=float, nargs="+", default=list(config.NOISE_MULTIPLIERS),
                   help="noise multipliers (inf: non-private)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(config.GAN_SEEDS), help="GAN seeds")
    p.add_argument("--epochs", type=int, default=config.EPOCHS, help="GAN epochs of every job")
    p.add_argument("--thresh", type=float, default=config.THRESH, help="label threshold of the synthetic sets")
    p.add_argument("--reference_lrd", type=float, default=config.REFERENCE_LRD,
                   help="critic learning rate of the noise-inf jobs only (default: config.REFERENCE_LRD; where that "
                        "is None, every job takes --lrd)")
    p.add_argument("--executor", default=None, help="slurm or local (default: slurm when sbatch is on the PATH)")
    p.add_argument("--status", action="store_true", help="print the table of the grid's jobs; submit nothing")
    slurm = p.add_argument_group("SLURM (and local) job settings")
    slurm.add_argument("--partition", default=config.SWEEP_PARTITION, help="SLURM partition (default: the cluster's)")
    slurm.add_argument("--gpus_per_job", type=int, default=config.SWEEP_GPUS_PER_JOB)
    slurm.add_argument("--cpus_per_job", type=int, default=config.SWEEP_CPUS_PER_JOB)
    slurm.add_argument("--mem", type=int, default=config.SWEEP_MEM_GB, help="GB of memory per job")
    slurm.add_argument("--time", type=int, default=config.SWEEP_TIME_MIN,
                       help="minutes per job before it is requeued (it then resumes from its last checkpoint)")
    slurm.add_argument("--max_parallel", type=int, default=None,
                       help="jobs running at once (default: SLURM 40; local: 1 on a CPU, one per visible GPU)")
    args, gan_flags = p.parse_known_args(argv)
    args.executor = args.executor or default_executor()
    if args.max_parallel is None:
        args.max_parallel = default_max_parallel(args.executor)
    return args, gan_flags


@script_main
def main(argv=None):
    print_setup("sweep")
    args, gan_flags = parse_args(argv)
    check_flags(args)
    if not args.status:
        with owned(sweep_dir(), "the sweep"):  # two submitting commands would submit the same jobs twice
            submitted = submit(args, gan_flags)
            print(f"{len(submitted)} job(s) submitted" + (f": {', '.join(submitted)}" if submitted else
                                                            " (everything is done or under way)"), flush=True)
    rows = status_rows([(n, s) for n in args.noisem for s in args.seeds], args.thresh, args.epochs)
    print(format_status(rows), flush=True)
    return rows


if __name__ == "__main__":
    main()
