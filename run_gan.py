"""Step 2: train a (differentially private) WGAN on the training patches
(paper sections 3.2-3.3; docs/cluster.md, "One GAN by hand").

The authors' command works as written:
    python3 run_gan.py --trial "GAN1" --noisem 1 --max_norm_dp 1 --clip_param_W 0.01 --n_discr 5 --batch_size 32 \
        --lrd 0.00005 --lrg 0.00005 --ndf 96 --ngf 96 --kd 4 --kg 4 --strd 2 --strg 2 --opg 0 --padg 1 \
        --epochs 50 --seed 12
--dp_mode strict (default) accounts validly; --dp_mode paper runs the authors' loop and reports both its
epsilon and the valid one. --noisem inf trains without privacy. --resume continues from the newest checkpoint (a trial
stopped in epoch 0 starts again); one run at a time owns a trial (utils/locks.py).
Seeded runs replay exactly (research); a run whose synthetic data will be shared should use --secure_rng.
Outputs: gan_model_dir(trial)/epoch_<e>.pth and gan_results_dir(trial)/{config.json, log.csv, *.png}.
"""

import argparse

from tqdm import tqdm

import config
from utils.common import add_device_arg, gan_results_dir, print_setup, script_main
from utils.gan import PROGRESS_EVERY, GanTrial
from utils.gan_steps import GRAD_SAMPLE_MODES, LOSSES, OPTIMIZERS
from utils.locks import owned
from utils.privacy import DP_MODES


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trial", required=True, help="trial name: outputs go to WGAN_<trial> folders")
    p.add_argument("--noisem", type=float, default=config.NOISE_MULTIPLIER, help="noise multiplier; inf: non-private")
    p.add_argument("--max_norm_dp", type=float, default=config.MAX_NORM_DP, help="per-sample gradient clipping norm")
    p.add_argument("--clip_param_W", type=float, default=config.CLIP_PARAM_W, help="WGAN critic weight clip")
    p.add_argument("--n_discr", type=int, default=config.N_DISCR, help="critic iterations per generator update")
    p.add_argument("--adaptive_critic", type=float, default=config.ADAPTIVE_CRITIC, metavar="ACCURACY",
                   help="Bie et al.'s adaptive schedule: n_D climbs from --n_discr (1, 2, 5, 10, 20, ...) when the "
                        "critic's smoothed accuracy on generated samples falls to ACCURACY (theirs: 0.6); an epoch "
                        "keeps the critic steps, so epsilon, of the fixed --n_discr plan (needs --loss ns or hinge)")
    p.add_argument("--adaptive_grace", type=int, default=config.ADAPTIVE_GRACE, metavar="UPDATES",
                   help="generator steps between two changes of the adaptive n_D")
    p.add_argument("--batch_size", type=int, default=config.BATCH_SIZE, help="expected (Poisson) batch size")
    p.add_argument("--lrd", type=float, default=config.LRD, help="critic learning rate")
    p.add_argument("--lrg", type=float, default=config.LRG, help="generator learning rate")
    p.add_argument("--ndf", type=int, default=config.NDF, help="critic filters")
    p.add_argument("--ngf", type=int, default=config.NGF, help="generator filters")
    p.add_argument("--kd", type=int, default=config.KD, help="critic kernel size")
    p.add_argument("--kg", type=int, default=config.KG, help="generator kernel size")
    p.add_argument("--strd", type=int, default=config.STRD, help="critic stride")
    p.add_argument("--strg", type=int, default=config.STRG, help="generator stride")
    p.add_argument("--opg", type=int, default=config.OPG, help="generator output padding")
    p.add_argument("--padg", type=int, default=config.PADG, help="generator padding")
    p.add_argument("--epochs", type=int, default=config.EPOCHS, help="epochs of round(N / batch) generator updates")
    p.add_argument("--seed", type=int, default=config.GAN_SEED, help="random seed")
    p.add_argument("--upsampling", action=argparse.BooleanOptionalAction, default=config.UPSAMPLING,
                   help="generator variant: linear stem, nearest upsampling and 5x5 convolutions")
    p.add_argument("--dp_mode", default=config.DP_MODE,
                   help=f"one of {', '.join(DP_MODES)} (docs/method.md: Strict and paper accounting)")
    p.add_argument("--arch", default=config.ARCH, choices=("paper", "dcgan"),
                   help="networks: the paper's, or the small DCGAN pair (ngf, ndf set their widths)")
    p.add_argument("--loss", default=config.LOSS, help=f"GAN loss: one of {', '.join(LOSSES)} (wgan clips weights)")
    p.add_argument("--optimizer", default=config.OPTIMIZER, help=f"one of {', '.join(OPTIMIZERS)}")
    p.add_argument("--beta1", type=float, default=config.BETA1, help="Adam's first beta (the second is 0.999)")
    p.add_argument("--ema", type=float, default=config.EMA,
                   help="decay of the generator's weight average that synthesis samples (0: off; free under DP)")
    p.add_argument("--diffaugment", action=argparse.BooleanOptionalAction, default=config.DIFFAUGMENT,
                   help="flip and translate real and generated pairs before the critic (DiffAugment)")
    p.add_argument("--label_scale", default=config.LABEL_SCALE, choices=("01", "pm1"),
                   help="real labels as 0/1 (the paper) or -1/1")
    p.add_argument("--privacy_unit", default=config.PRIVACY_UNIT, choices=("patch", "patient"),
                   help="what epsilon protects: one patch (the paper) or one patient (all his patches)")
    p.add_argument("--batch_patients", type=int, default=config.BATCH_PATIENTS,
                   help="--privacy_unit patient: expected (Poisson) patients per critic iteration; an epoch is "
                        "round(patients / batch_patients) generator updates")
    p.add_argument("--patches_per_patient_step", type=int, default=config.PATCHES_PER_PATIENT_STEP,
                   help="--privacy_unit patient: patches each sampled patient contributes, drawn afresh each time")
    p.add_argument("--resume", action="store_true", help="continue the trial from its newest checkpoint")
    p.add_argument("--secure_rng", action="store_true",
                   help="draw the DP noise and the Poisson batches from a generator seeded from the operating "
                        "system's entropy, recorded nowhere that is released (use it for a run whose data will be "
                        "shared; --seed still seeds the networks' initialisation)")
    p.add_argument("--audit_canaries", type=int, default=0, metavar="M",
                   help="privacy audit (audit_privacy.py --canaries): make M canary patches and train on each with "
                        "probability 1/2; such a run's data are never released (0: off)")
    p.add_argument("--init_from", default=config.INIT_FROM, metavar="CHECKPOINT",
                   help="start the generator and critic from this run_gan.py checkpoint (epoch_<e>.pth) of a run on "
                        "PUBLIC data (not these patients'): epsilon covers this run's training data only")
    add_device_arg(p)
    p.add_argument("--grad_sample_mode", default=config.GRAD_SAMPLE_MODE,
                   help=f"per-sample clipping engine: bk (book-keeping, utils/bookkeeping.py) or one of Opacus's; "
                        f"one of {', '.join(GRAD_SAMPLE_MODES)}; all give the same update")
    p.add_argument("--max_physical_batch", type=int, default=config.MAX_PHYSICAL_BATCH, metavar="SAMPLES",
                   help="bk engine: at most this many samples (real + generated; whole patients) per forward and "
                        "backward pass, for a batch too large for the device's memory; the update is the same "
                        "(default: the whole batch in one pass)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=config.AMP,
                   help="mixed precision: the networks' passes in bfloat16 (faster on a GPU and on CPUs with bfloat16 "
                        "instructions); a private run's per-sample norms, clipping and noise stay float32 (needs "
                        "--grad_sample_mode bk)")
    return p.parse_args(argv)


def generator_update(trial, args, critic_steps=None):
    """critic_steps (default n_discr) critic iterations, then one generator step (benchmarks/bench_gan_update.py
    times this)."""
    real = trial.real_batch()
    for i in range(critic_steps or args.n_discr):
        if i > 0 and args.dp_mode == "strict":
            real = trial.real_batch()  # strict: a fresh Poisson batch per critic iteration; paper: reuse
        trial.critic_step(real, trial.fake_batch())  # clipped + noised + accounted when private
    trial.generator_step()  # post-processing: the critic's per-sample hooks are off


@script_main
def main(argv=None):
    print_setup("run_gan.py")
    args = parse_args(argv)
    with owned(gan_results_dir(args.trial), f"GAN trial {args.trial!r}"):  # one run per trial, or they mix outputs
        trial = GanTrial(args)  # validates flags and data, builds networks, privacy engine, sampler; resumes
        if trial.start_epoch >= args.epochs:
            print(f"trial {args.trial!r}: all {args.epochs} epochs are done already (last checkpoint: epoch "
                  f"{trial.start_epoch - 1}); pass a larger --epochs to train on")
            return trial
        for epoch in range(trial.start_epoch, args.epochs):
            trial.begin_epoch(epoch)
            bar = tqdm(total=trial.critic_steps_per_epoch, desc=f"epoch {epoch}", unit="critic step", leave=False)
            done, updates = 0, 0
            while done < trial.critic_steps_per_epoch:  # updates_per_epoch x n_discr noisy steps, however scheduled
                steps = trial.critic_steps_next(done)  # --n_discr, or the adaptive schedule's
                generator_update(trial, args, steps)
                done, updates = done + steps, updates + 1
                bar.update(steps)
                if (updates - 1) % PROGRESS_EVERY == 0:
                    bar.set_postfix(trial.progress())
            bar.close()
            trial.end_epoch()  # log.csv, plots, samples, then the checkpoint that commits the epoch; one line
    return trial


if __name__ == "__main__":
    main()
