"""One GAN trial's training (run_gan.py): GanTrial wires the parts together, and run_gan.py's loop calls its verbs.

The parts, one role each:
- utils/gan_data.py: the training patches, scaled, and the Poisson batches of patches or patients;
- utils/gan_steps.py: the private and plain critic steps (Opacus wiring), the generator step, as free functions;
- utils/gan_checkpoints.py: the networks, checkpoints, RNG states, the public warm start and --resume;
- utils/gan_log.py: log.csv, the figures and the epoch's line;
- utils/privacy.py: every epsilon, from the accountant's history (privacy.guarantee).
Method: docs/method.md, "The DP-WGAN" and "Strict and paper accounting".
"""

import copy
import functools
import math
import random
import secrets
import time

import numpy as np
import torch

import config
from utils import privacy
from utils.canaries import canaries_path, load_canaries, make_canaries, save_canaries
from utils.common import (
    PipelineError,
    check_writable,
    config_values,
    file_sha256,
    gan_model_dir,
    gan_results_dir,
    patches_path,
    resolve_device,
    save_json,
    save_torch,
    versions,
)
from utils.critic_schedule import AdaptiveCriticSteps
from utils.gan_checkpoints import (
    build_networks,
    check_resumed_settings,
    checkpoint_path,
    load_checkpoint,
    model_args,
    restore_rng_states,
    rng_states,
    start_epoch,
    start_from_public,
)
from utils.gan_data import (
    endless,
    largest_patient_group,
    patient_batches,
    patient_units,
    poisson_sampler,
    read_patches,
    scale_pairs,
    seed_generators,
    to_device,
)
from utils.gan_log import (
    DP_DIAGNOSTICS,
    describe_diagnostics,
    describe_group_privacy,
    plot_epsilon,
    plot_losses,
    plot_samples,
    read_log,
    write_log,
)
from utils.gan_steps import (
    GRAD_SAMPLE_MODES,
    LOSSES,
    OPTIMIZERS,
    diff_augment,
    generator_step,
    make_optimizer,
    make_private_critic,
    paper_critic_step,
    plain_critic_step,
    private_critic_step,
    update_ema,
)

N_FIXED_SAMPLES = 8  # generator samples drawn from one fixed noise batch after every epoch
PROGRESS_EVERY = 20  # generator updates between refreshes of the progress bar's epsilon (~20 ms each)


def check_flags(args):
    """Refuse (PipelineError naming the flag) settings no run can train with, before anything is read or written."""
    checks = [(args.max_norm_dp > 0, f"--max_norm_dp {args.max_norm_dp}: the clipping norm must be > 0"),
              (args.clip_param_W > 0, f"--clip_param_W {args.clip_param_W}: the WGAN weight clip must be > 0"),
              (args.lrd > 0 and args.lrg > 0, f"--lrd {args.lrd} --lrg {args.lrg}: learning rates must be > 0"),
              (args.epochs >= 1, f"--epochs {args.epochs}: must be at least 1"),
              (0 <= args.ema < 1, f"--ema {args.ema}: the EMA decay must lie in [0, 1) (0: off)"),
              (args.loss in LOSSES, f"--loss {args.loss!r}: choose one of {', '.join(LOSSES)}"),
              (args.optimizer in OPTIMIZERS,
               f"--optimizer {args.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}"),
              (args.dp_mode != "paper" or (args.loss == "wgan" and not args.diffaugment),
               "--dp_mode paper is the authors' loop: it needs --loss wgan and no --diffaugment"),
              (args.grad_sample_mode in GRAD_SAMPLE_MODES,
               f"--grad_sample_mode {args.grad_sample_mode!r}: choose one of {', '.join(GRAD_SAMPLE_MODES)}"),
              (args.max_physical_batch is None or (args.max_physical_batch >= 1 and args.grad_sample_mode
                                                    == "bk" and args.dp_mode == "strict"),
               f"--max_physical_batch {args.max_physical_batch}: needs a size >= 1, --grad_sample_mode bk and "
               f"--dp_mode strict"),
              (not args.amp or math.isinf(args.noisem) or args.grad_sample_mode == "bk",
               f"--amp: a private run needs --grad_sample_mode bk (not {args.grad_sample_mode}), whose norms "
               f"and clipping run in float32"),
              (args.audit_canaries >= 0, f"--audit_canaries {args.audit_canaries}: must be >= 0 (0: none)"),
              (not args.audit_canaries or args.privacy_unit == "patch",
               "--audit_canaries audits the per-patch guarantee: it needs --privacy_unit patch (a canary is "
               "one patch, not a patient)")]
    if args.adaptive_critic is not None:
        # (so never in paper mode, which needs --loss wgan)
        checks += [(args.loss in ("ns", "hinge"), f"--adaptive_critic reads the critic's verdict on generated samples "
                                                  f"from the sign of its score: it needs --loss ns or hinge, not "
                                                  f"{args.loss}")]
    for ok, message in checks:
        if not ok:
            raise PipelineError(message)
    try:
        critic_schedule(args)
        privacy.check_settings(noisem=args.noisem, batch_size=args.batch_size, n_discr=args.n_discr,
                               dp_mode=args.dp_mode)
    except ValueError as err:
        raise PipelineError(str(err)) from None


def critic_schedule(args):
    """The adaptive n_D schedule of --adaptive_critic, or None (n_D fixed at --n_discr)."""
    if args.adaptive_critic is None:
        return None
    return AdaptiveCriticSteps(args.n_discr, args.adaptive_critic, args.adaptive_grace)


def audit_canaries(args, results_dir, img, label, resuming):
    """The trial's audit canaries (utils/canaries.py): made and drawn now (saved with the config), or on --resume
    read back."""
    path = canaries_path(results_dir)
    if resuming:
        return load_canaries(path)
    seed = secrets.randbits(64) if args.secure_rng else [args.seed, 7]
    canaries = make_canaries(img, label, args.audit_canaries, np.random.default_rng(seed))
    print(f"audit canaries: {len(canaries['included'])} made, {int(canaries['included'].sum())} included in the "
          f"training set (which ones: {path}, internal); this run's data are for the audit only and are never "
          f"released", flush=True)
    return canaries


class GanTrial:
    """Everything one trial's training loop needs: networks, optimizers, privacy engine, sampler and outputs.

    Set up in named stages, in this order (the random draws of each depend on the ones before): the data and the
    accounting's N, q and delta; the networks (seeded), the public start and the optimizers; the privacy wiring
    and the sampler; then the trial's state restored (--resume) or its config.json written."""

    def __init__(self, args):
        self.args = args
        check_flags(args)
        self.model_dir, self.results_dir = gan_model_dir(args.trial), gan_results_dir(args.trial)
        self.start_epoch = start_epoch(args, self.model_dir, self.results_dir)  # repairs a stopped run; refuses
        self.resuming = self.start_epoch > 0
        self._read_data()
        self._build_networks()
        checkpoint = self._load_checkpoint() if self.resuming else None
        self._wire_privacy()
        self._check_writable()  # nothing is written before this point (but the repairs of start_epoch)
        if checkpoint is not None:
            if self.private:
                self.engine.accountant.history = [tuple(h) for h in checkpoint["accountant"]["history"]]
            restore_rng_states(checkpoint["rng"], self.sampler_generator, self.noise_generator)
        else:
            self._write_config()

    # -- setup stages --
    def _read_data(self):
        """The training pairs (with any audit canaries), the privacy unit and the accounting's N, q and delta."""
        args = self.args
        img, label, patients, self.skull_stripped = read_patches()
        self.data = scale_pairs(img, label, args.label_scale)
        # Audit canaries drawn in join the training set as units of their own; the accounting counts all of them.
        self.canaries = audit_canaries(args, self.results_dir, img, label, self.resuming) \
            if args.audit_canaries else None
        if self.canaries is not None:
            included = self.canaries["included"]
            self.data = torch.cat([self.data, scale_pairs(self.canaries["img"][included],
                                                          self.canaries["label"][included], args.label_scale)])
        del img, label
        self.n_samples = len(self.data)
        self.patient_group = largest_patient_group(patients)
        # The privacy unit: patches, or patients (each sampled patient gives k patches per critic iteration).
        self.patches_of = patient_units(patients, args) if args.privacy_unit == "patient" else None
        self.n_units = len(self.patches_of) if self.patches_of else self.n_samples
        self.batch_units = args.batch_patients if self.patches_of else args.batch_size
        try:
            privacy.check_settings(batch_size=self.batch_units, n_samples=self.n_units)
        except ValueError as err:
            raise PipelineError(str(err).replace("--batch_size", "--batch_patients" if self.patches_of else
                                                 "--batch_size")) from None
        self.private = not math.isinf(args.noisem)
        # The N of the accounting: the units trained on, except in a canary run, where all M canaries count
        # whether drawn in or not, so that q, the number of steps and delta do not depend on the inclusion draw
        # (the audit's secret): the mechanism is then the same subsampled Gaussian for every draw.
        self.n_accounted = self.n_units + (int((~self.canaries["included"]).sum()) if self.canaries else 0)
        self.delta = config.DELTA if config.DELTA is not None else 1.0 / self.n_accounted
        self.sample_rate = self.batch_units / self.n_accounted
        self.updates_per_epoch = privacy.steps_per_epoch(self.n_accounted, self.batch_units)
        # The noisy steps of an epoch: those of the fixed --n_discr plan, also when the schedule adapts n_D.
        self.critic_steps_per_epoch = self.updates_per_epoch * args.n_discr
        self.device = resolve_device(args.device)

    def _build_networks(self):
        """Seeded networks (from the public GAN with --init_from), the fixed noise of the figures, the optimizers."""
        args = self.args
        torch.manual_seed(args.seed)
        np.random.seed(args.seed)
        random.seed(args.seed)
        self.model_args = model_args(args)
        self.generator, self.critic = build_networks(self.model_args)
        self.generator_updates, self.log_rows = 0, []
        self.critic_schedule = critic_schedule(args)
        self.patches_sha256 = file_sha256(patches_path("train"))
        if self.resuming:
            check_resumed_settings(args, self.results_dir, self.n_samples, self.patches_sha256)
        # A public warm start: on --resume the trial's own checkpoint overrides it, so it is read only at the start.
        self.init_sha256 = start_from_public(self.generator, self.critic, args.init_from, self.model_args,
                                             self.patches_sha256, self.skull_stripped) \
            if args.init_from and not self.resuming else None
        self.sampler_generator, self.noise_generator = seed_generators(args.seed, args.secure_rng, self.device)
        self.fixed_noise = torch.randn(N_FIXED_SAMPLES, config.LATENT_DIM,
                                       generator=torch.Generator().manual_seed(args.seed + 1)).to(self.device)
        self.generator.to(self.device)
        self.critic.to(self.device)
        # On a GPU the training pairs stay in its memory where they take under a quarter of what is free (the
        # paper's 41,000 patches: 3 GB): a batch is then gathered there, with no copy from the host per step.
        if self.device.type == "cuda" and self.data.nbytes < torch.cuda.mem_get_info(self.device)[0] / 4:
            self.data = self.data.to(self.device)
        self.generator_ema = copy.deepcopy(self.generator) if args.ema > 0 else None
        self.opt_g = make_optimizer(self.generator.parameters(), args.optimizer, args.lrg, args.beta1)
        self.opt_d = make_optimizer(self.critic.parameters(), args.optimizer, args.lrd, args.beta1)
        # The loss and the augmentation go into every critic and generator step; WGAN alone clips weights.
        self.step_options = dict(loss=args.loss, augment=diff_augment if args.diffaugment else None)
        self.autocast = functools.partial(torch.autocast, self.device.type, torch.bfloat16, enabled=args.amp)
        self.weight_clip = args.clip_param_W if args.loss == "wgan" else None

    def _wire_privacy(self):
        """The critic step and the Poisson sampler: Opacus's DP optimizer around the critic for a private run
        (utils.gan_steps.make_private_critic), the plain step otherwise."""
        args = self.args
        if self.private:
            self.d, self.opt_d, self.engine, sampler = make_private_critic(
                self.critic, self.opt_d, self.n_units, self.sample_rate, self.batch_units, args.noisem,
                args.max_norm_dp, args.grad_sample_mode, self.sampler_generator, self.noise_generator)
            self.critic_step_fn = paper_critic_step if args.dp_mode == "paper" else functools.partial(
                private_critic_step, **self.step_options,
                patches_per_patient=args.patches_per_patient_step if self.patches_of else None,
                max_physical_batch=args.max_physical_batch)
        else:
            self.d, self.engine = self.critic, None
            sampler = poisson_sampler(self.n_units, self.sample_rate, self.sampler_generator)
            self.critic_step_fn = functools.partial(plain_critic_step, **self.step_options)
        self.indices = patient_batches(sampler, self.patches_of, args.patches_per_patient_step,
                                       self.sampler_generator) if self.patches_of else endless(sampler)

    def _load_checkpoint(self):
        """Networks, optimizers, generator updates and log rows of the newest checkpoint; returns it."""
        # On the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest to the networks' device.
        checkpoint = load_checkpoint(checkpoint_path(self.args.trial, self.start_epoch - 1))
        self.generator.load_state_dict(checkpoint["generator"])
        if self.generator_ema is not None:
            self.generator_ema.load_state_dict(checkpoint["generator_ema"])
        self.critic.load_state_dict(checkpoint["discriminator"])
        self.opt_g.load_state_dict(checkpoint["opt_g"])
        self.opt_d.load_state_dict(checkpoint["opt_d"])
        self.generator_updates = checkpoint["accountant"]["generator_updates"]
        if self.critic_schedule is not None:
            self.critic_schedule.load_state_dict(checkpoint["critic_schedule"])
        self.log_rows = [row for row in read_log(self.results_dir / "log.csv") if row["epoch"] < self.start_epoch]
        return checkpoint

    def _check_writable(self):
        """Before training: both folders can be written, the checkpoints' with room for two of them (a checkpoint
        holds the networks, their optimizer states and the EMA: about five copies of the weights)."""
        weights = sum(p.numel() * p.element_size() for p in self.parameters())
        check_writable(self.model_dir, "checkpoints", need_bytes=2 * 5 * weights)
        check_writable(self.results_dir, "log and figures", need_bytes=10_000_000)

    def _write_config(self):
        save_json(self.results_dir / "config.json",
                  {"args": vars(self.args), "preset": config.PRESET, "versions": versions(), "config": config_values(),
                   "n_samples": self.n_samples, "delta": self.delta, "sample_rate": self.sample_rate,
                   "updates_per_epoch": self.updates_per_epoch, "patches_per_patient_max": self.patient_group,
                   "privacy_unit": self.args.privacy_unit, "n_units": self.n_units, "n_accounted": self.n_accounted,
                   "seeded": not self.args.secure_rng, "init_sha256": self.init_sha256,
                   "patches_sha256": self.patches_sha256, "skull_stripped": self.skull_stripped})
        if self.canaries is not None:
            save_canaries(canaries_path(self.results_dir), self.canaries)
        self.model_dir.mkdir(parents=True, exist_ok=True)

    # -- the loop's verbs --
    def real_batch(self):
        """A fresh Poisson batch of real pairs (possibly empty). The sampler draws on the CPU; its indices (or the
        batch, where the pairs stay on the host) reach a GPU without making the host wait (to_device)."""
        indices = torch.as_tensor(next(self.indices), dtype=torch.long)  # may be []
        return to_device(self.data[to_device(indices, self.data.device)], self.device)

    def fake_batch(self):
        """batch_units generated pairs: as many as the expected real units, so both halves have one scale."""
        with torch.no_grad(), self.autocast():
            z = torch.randn(self.batch_units, self.generator.latent_dim, device=self.device)
            return self.generator(z).float()

    def begin_epoch(self, epoch):
        self.epoch, self.started = epoch, time.time()
        # Running sums and finiteness stay tensors on the device: reading one back (.item(), bool()) would make a
        # GPU wait for every step. They are read every PROGRESS_EVERY updates (check_finite, progress) and at the
        # epoch's end.
        zero = torch.zeros((), device=self.device)
        self.sums = dict(real=zero, n_real=0, fake=zero, n_fake=0, loss_g=zero, n_g=0)
        self.finite = {what: torch.ones((), dtype=torch.bool, device=self.device)
                       for what in ("critic loss", "generator loss")}
        self.diagnostics = []

    def critic_steps_next(self, done):
        """Critic steps before the next generator step, done of the epoch's critic_steps_per_epoch taken: n_D, or
        the rest of the epoch where n_D does not divide it."""
        return min(self.current_n_discr(), self.critic_steps_per_epoch - done)

    def critic_step(self, real, fake):
        with self.autocast():
            real_scores, fake_scores, diagnostics = self.critic_step_fn(self.d, self.opt_d, real, fake,
                                                                        self.weight_clip)
        if diagnostics is not None:
            self.diagnostics.append(diagnostics)
        self.finite["critic loss"] &= torch.isfinite(torch.cat([real_scores, fake_scores])).all()
        self.sums["real"] = self.sums["real"] + real_scores.sum()
        self.sums["n_real"] += len(real_scores)
        self.sums["fake"] = self.sums["fake"] + fake_scores.sum()
        self.sums["n_fake"] += len(fake_scores)

    def generator_step(self):
        with self.autocast():
            scores = generator_step(self.generator, self.d, self.opt_g, self.batch_units, self.device,
                                    **self.step_options)
        if self.generator_ema is not None:
            update_ema(self.generator_ema, self.generator, self.args.ema)
        if self.critic_schedule is not None:
            self.critic_schedule.observe(scores)
        self.finite["generator loss"] &= torch.isfinite(scores).all()
        self.sums["loss_g"] = self.sums["loss_g"] - scores.mean()
        self.sums["n_g"] += 1
        self.generator_updates += 1

    def check_finite(self):
        """Stop (PipelineError) if a critic or generator loss since the epoch began was not finite."""
        for what, finite in self.finite.items():
            self._stop_unless(bool(finite), what)

    def _stop_unless(self, finite, what):
        if finite:
            return
        last = self.epoch - 1
        kept = (f"the last good checkpoint is {checkpoint_path(self.args.trial, last)} (epoch {last})" if last >= 0
                else f"no checkpoint was written (delete {self.model_dir} and {self.results_dir} to start again)")
        raise PipelineError(f"epoch {self.epoch}, by generator update {self.generator_updates}: the {what} is not "
                            f"finite; training stopped and {kept}. Lower --lrd/--lrg or change --seed.")

    def parameters(self):
        return [*self.generator.parameters(), *self.critic.parameters()]

    def epoch_means(self):
        s = self.sums
        d_real, d_fake = s["real"] / max(s["n_real"], 1), s["fake"] / max(s["n_fake"], 1)
        means = {k: float(v) for k, v in dict(loss_d=d_fake - d_real, loss_g=s["loss_g"] / max(s["n_g"], 1),
                                              wasserstein=d_real - d_fake, d_real=d_real, d_fake=d_fake).items()}
        steps = torch.stack(self.diagnostics) if self.diagnostics else torch.full((1, 3), float("nan"))
        # nanmedian/nanmean: an empty Poisson batch has no per-sample norms
        values = [steps[:, 0].nanmedian(), steps[:, 1].nanmean(), steps[:, 2][steps[:, 2].isfinite()].mean()]
        return {**means, **{k: float(v) for k, v in zip(DP_DIAGNOSTICS, values)}}

    def current_n_discr(self):
        """Critic steps per generator step now: --n_discr, or the adaptive schedule's rung."""
        return self.args.n_discr if self.critic_schedule is None else self.critic_schedule.n_discr

    # -- privacy --
    def accounted_steps(self):
        return sum(h[2] for h in self.engine.accountant.history) if self.private else 0

    def guarantee(self, prv=False):
        """privacy.guarantee of the run so far: epsilon as the DP optimizer's hook counted it (in paper mode the
        paper's count, not a valid bound), epsilon_valid, with prv the PRV epsilon, and the per-patient statement
        (patient-level DP: the guarantee itself)."""
        return privacy.guarantee(self.engine.accountant.history if self.private else None, self.delta,
                                 self.args.dp_mode, self.args.noisem, self.sample_rate, self.generator_updates,
                                 self.args.n_discr, group_size=1 if self.patches_of else self.patient_group, prv=prv)

    def progress(self):
        self.check_finite()
        means, g = self.epoch_means(), self.guarantee()
        shown = {"eps": f"{g['epsilon_valid']:.3f}"} if self.args.dp_mode == "strict" else \
            {"eps_valid": f"{g['epsilon_valid']:.3g}", "eps_paper_count(invalid)": f"{g['epsilon']:.3f}"}
        if self.critic_schedule is not None:
            shown["n_D"] = self.current_n_discr()
        return {"loss_d": f"{means['loss_d']:.4f}", "loss_g": f"{means['loss_g']:.4f}", **shown}

    # -- end of an epoch: log, figures, then the checkpoint that commits it; one line --
    def end_epoch(self):
        epoch = self.epoch
        # The last update may have broken a network without any loss showing it yet: never save that.
        self.check_finite()
        self._stop_unless(bool(torch.isfinite(torch.cat([p.detach().flatten() for p in self.parameters()])).all()),
                          "network weights")
        g = self.guarantee(prv=True)
        epsilon, epsilon_valid = g["epsilon"], g["epsilon_valid"]
        epsilon_prv = g["epsilon_valid_prv"]
        row = {"epoch": epoch, **self.epoch_means(), "epsilon": epsilon, "epsilon_valid": epsilon_valid,
               "epsilon_valid_prv": epsilon_prv, "steps": self.accounted_steps(),
               "generator_updates": self.generator_updates, "n_discr": self.current_n_discr(),
               "seconds": time.time() - self.started}
        checkpoint = {  # the state at the epoch's end, RNG states included, taken before anything else runs
            "epoch": epoch, "generator": self.generator.state_dict(), "discriminator": self.critic.state_dict(),
            "generator_ema": None if self.generator_ema is None else self.generator_ema.state_dict(),
            "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
            "accountant": {"history": list(self.engine.accountant.history) if self.private else [],
                           "generator_updates": self.generator_updates, "sample_rate": self.sample_rate,
                           "delta": self.delta, "dp_mode": self.args.dp_mode},
            "critic_schedule": None if self.critic_schedule is None else self.critic_schedule.state_dict(),
            "rng": rng_states(self.sampler_generator, self.noise_generator), "model_args": self.model_args}
        # The checkpoint is written last and commits the epoch (utils/gan_checkpoints.py).
        self.log_rows.append(row)
        write_log(self.results_dir / "log.csv", self.log_rows)
        plot_losses(self.results_dir / "losses.png", self.log_rows)
        plot_epsilon(self.results_dir / "epsilon.png", self.log_rows, self.args.dp_mode)
        with torch.no_grad():
            shown = (self.generator_ema or self.generator).eval()
            samples = shown(self.fixed_noise).cpu().numpy()
            shown.train()
        plot_samples(self.results_dir / f"samples_epoch_{epoch}.png", samples, epoch)
        save_torch(checkpoint_path(self.args.trial, epoch), checkpoint)
        schedule = "" if self.critic_schedule is None else \
            f" (adaptive n_D, now {row['n_discr']}, {self.generator_updates} generator updates)"
        counted = "" if self.args.dp_mode == "strict" else f" (the paper's count, not a valid bound: {epsilon:.4g})"
        print(f"epoch {epoch}/{self.args.epochs - 1} | internal, not covered by epsilon: loss_d {row['loss_d']:.5f} "
              f"loss_g {row['loss_g']:.5f} W {row['wasserstein']:.5f} D(x) {row['d_real']:.4f} "
              f"D(G(z)) {row['d_fake']:.4f}{describe_diagnostics(row)} | per patch: epsilon {epsilon_valid:.4g} "
              f"(RDP), {epsilon_prv:.4g} (PRV), "
              f"delta {self.delta:.3g}{counted} | per patient: {describe_group_privacy(g['per_patient'])} | "
              f"steps {row['steps']}{schedule} | {row['seconds']:.1f} s", flush=True)
        return row
