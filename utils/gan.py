"""DP-WGAN training mechanics (SPEC step 2): the private critic step, data, checkpoints, logs and figures.

run_gan.py holds the training loop; this module holds what one step, one epoch end or one resume does.

Privacy (SPEC "DP-WGAN", "The private critic step"): only the critic sees real data. Its gradient is clipped per
sample to max_norm_dp (by utils.bookkeeping, engine bk, or by Opacus's engines); Opacus's DP optimizer adds
Gaussian noise noisem x max_norm_dp, divides by the expected batch size and counts one accountant step per noisy
step. Batches are Poisson samples at rate batch / N.
- strict (`private_critic_step`): the standard DP-GAN step. A fresh Poisson batch per critic iteration; the
  real AND the fake samples go through per-sample clipping in one backward pass, one noise draw, one step
  accounted at q = batch / N. The fake samples cost no privacy (they depend on the generator only); clipping
  them too keeps the two halves of the critic loss on one scale. Every accounted step is one subsampled
  Gaussian release: the reported epsilon is a valid bound.
- paper (`paper_critic_step`): the authors' loop; one Poisson batch per generator update reused by all
  n_discr critic iterations, each taking a noisy step on the real and one on the fake batch, both counted
  (the paper's epsilon). The valid bound of that loop comes from utils.privacy.valid_paper_history.
The generator runs the critic with Opacus's per-sample hooks off (`critic_without_privacy_hooks`): its
gradients are post-processing.
"""

import copy
import csv
import functools
import math
import random
import re
import secrets
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import AbstractGradSampleModule, GradSampleHooks, GradSampleModuleFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import TensorDataset

import config
from model import PATCH, DCGANCritic, DCGANGenerator, Discriminator, Generator
from utils import bookkeeping, privacy
from utils.canaries import canaries_path, load_canaries, make_canaries, save_canaries
from utils.common import (
    PipelineError,
    atomic_write,
    check_writable,
    config_values,
    file_sha256,
    gan_model_dir,
    gan_results_dir,
    load_json,
    load_npz,
    minmax_scale,
    patches_path,
    remove_partial_files,
    resolve_device,
    save_figure,
    save_json,
    save_torch,
    versions,
)
from utils.data import preparation_name, stripped_of

# DP diagnostics (internal, like the losses): the median per-sample gradient norm before clipping, the fraction of
# samples clipped, and the norm of the noise over the norm of the clipped sum, averaged over the epoch's steps.
DP_DIAGNOSTICS = ("grad_norm_median", "clipped_fraction", "noise_to_signal")
LOG_COLUMNS = ("epoch", "loss_d", "loss_g", "wasserstein", "d_real", "d_fake", "epsilon", "epsilon_valid",
               "epsilon_valid_prv", *DP_DIAGNOSTICS, "steps", "seconds")
LOAD_CHUNK = 4096  # patches scaled at a time when loading
N_FIXED_SAMPLES = 8  # generator samples drawn from one fixed noise batch after every epoch
# Per-sample clipping engines: Opacus's four, and bk (utils/bookkeeping.py: book-keeping with mixed ghost norms).
GRAD_SAMPLE_MODES = ("bk", "hooks", "functorch", "ew", "ghost")
LOSSES = ("wgan", "hinge", "ns")
OPTIMIZERS = ("rmsprop", "adam")
# Flags that may change when a trial is resumed: they do not change what is trained or how it is accounted.
RESUMABLE_CHANGES = ("resume", "epochs", "device", "grad_sample_mode", "max_physical_batch", "amp")
# Flags newer than some trials, with the value those trials ran with (absent from their config.json).
FLAGS_ADDED_LATER = {"audit_canaries": 0, "init_from": None, "max_physical_batch": None, "amp": False}
PROGRESS_EVERY = 20  # generator updates between refreshes of the progress bar's epsilon (~20 ms each)
# Opacus registers full backward hooks on the critic's layers; the first layer's input (the data) needs no
# gradient, which PyTorch reports on every run. It is expected and harmless here.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect")


# ---- data ----
def read_patches():
    """(img, label, patients, skull_stripped) of the training patches file, checked: N x PATCH x PATCH each;
    patients is None if the file has no `patient` array."""
    path = patches_path("train")
    if not path.is_file():
        raise PipelineError(f"patches file {path} does not exist; run extract_patches.py first")
    arrays = load_npz(path, ["img", "label"], "patches file")
    img, label = arrays["img"], arrays["label"]
    if img.ndim != 3 or img.shape != label.shape or img.shape[1:] != (config.PATCH_SIZE, config.PATCH_SIZE):
        raise PipelineError(f"patches file {path}: img {img.shape} and label {label.shape} must both be "
                            f"N x {config.PATCH_SIZE} x {config.PATCH_SIZE}")
    if len(img) == 0:
        raise PipelineError(f"patches file {path} holds no patches")
    patients = arrays.get("patient")
    if patients is not None and len(patients) != len(img):
        raise PipelineError(f"patches file {path}: {len(patients)} patient ids for {len(img)} patches")
    return img, label, patients, stripped_of(arrays)


def scale_pairs(img, label, label_scale="01"):
    """float32 tensor N x 2 x H x W of the critic's input: image min-max scaled per patch to [-1, 1], label 0/1,
    or -1/1 for label_scale "pm1"."""
    pairs = np.empty((len(img), 2, *img.shape[1:]), np.float32)
    for start in range(0, len(img), LOAD_CHUNK):  # in chunks: the paper's 41,000 pairs alone take 3 GB
        chunk = slice(start, start + LOAD_CHUNK)
        pairs[chunk, 0] = minmax_scale(img[chunk], -1, 1)
        pairs[chunk, 1] = label[chunk] * 2.0 - 1.0 if label_scale == "pm1" else label[chunk]
    return torch.from_numpy(pairs)


def largest_patient_group(patients):
    """The most patches any one patient contributes (the group of the per-patient statement)."""
    if patients is None:
        return config.PATCHES_PER_PATIENT
    return int(np.unique(patients, return_counts=True)[1].max())


def seed_generators(seed, secure_rng, device):
    """(Poisson sampler generator on the CPU, DP noise generator on `device`).

    Seeded from `seed` for research runs that must replay exactly; with secure_rng from 64 bits of the operating
    system's entropy, which are written nowhere (the checkpoints keep the generators' states, so --resume works).
    They are PyTorch's ordinary generators, not a cryptographic one: Opacus's own secure_mode needs torchcsprng,
    which has no build for this torch."""
    seeds = [secrets.randbits(64), secrets.randbits(64)] if secure_rng else [seed, seed + 2]
    return (torch.Generator().manual_seed(seeds[0]), torch.Generator(device=device).manual_seed(seeds[1]))


def poisson_sampler(n_units, sample_rate, generator):
    """Opacus's Poisson sampler: every one of the n units (patches or patients) joins each batch independently
    with probability sample_rate (batch / N)."""
    return UniformWithReplacementSampler(num_samples=n_units, sample_rate=sample_rate, generator=generator)


def to_device(tensor, device):
    """`tensor` on `device`. A host tensor goes to a GPU through pinned memory, asynchronously: a plain copy from
    pageable memory makes the host wait until the GPU has run everything queued before it, every step."""
    if tensor.device.type != "cpu" or device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def endless(sampler):
    """Index lists from the sampler, one per batch, without end. Each batch draws only torch.rand(N) from
    the sampler's generator, so restoring that generator's state continues the same stream."""
    while True:
        yield from sampler


def patient_patches(patients):
    """One LongTensor of patch indices per patient (in order of first appearance in the patches file)."""
    _, first, inverse = np.unique(patients, return_index=True, return_inverse=True)
    order = np.argsort(first)
    return [torch.from_numpy(np.flatnonzero(inverse == i)) for i in order]


def patient_batches(sampler, patches_of, k, generator):
    """Patch indices of Poisson-sampled patients, without end: each sampled patient contributes k of his patches,
    a fresh random subset each time, consecutively (patient after patient). All draws come from `generator`."""
    for sampled in endless(sampler):
        chosen = [patches_of[p][torch.randperm(len(patches_of[p]), generator=generator)[:k]] for p in sampled]
        yield torch.cat(chosen) if chosen else torch.empty(0, dtype=torch.long)


# ---- networks ----
def model_args(args):
    return dict(arch=args.arch, ngf=args.ngf, kg=args.kg, strg=args.strg, padg=args.padg, opg=args.opg,
                latent_dim=config.LATENT_DIM, upsampling=args.upsampling, ndf=args.ndf, kd=args.kd, strd=args.strd,
                label_scale=args.label_scale, patch_size=config.PATCH_SIZE)


# model_args keys that define the generator (the release bundle keeps these and no more)
GENERATOR_ARGS = ("arch", "ngf", "kg", "strg", "padg", "opg", "latent_dim", "upsampling", "label_scale", "patch_size")


def dcgan_widths(ngf):
    """The dcgan generator's widths at 1/16, 1/8, 1/4, 1/2 and 1 of the patch size (ngf 8: 96, 48, 24, 12, 8)."""
    return (12 * ngf, 6 * ngf, 3 * ngf, max(1, 3 * ngf // 2), ngf)


def build_generator(margs):
    """The generator of model_args (arch "paper", the default of checkpoints older than the flag, or "dcgan"; patch
    size 96 for checkpoints older than config.PATCH_SIZE's use here)."""
    size = margs.get("patch_size", PATCH)
    if margs.get("arch", "paper") == "dcgan":
        try:
            return DCGANGenerator(dcgan_widths(margs["ngf"]), margs["latent_dim"], size)
        except ValueError as err:
            raise PipelineError(f"config.PATCH_SIZE: {err}") from None
    if size != PATCH:
        raise PipelineError(f"config.PATCH_SIZE = {size}: the paper's networks (--arch paper) make {PATCH} x {PATCH} "
                            f"patches only; use --arch dcgan for another size")
    try:
        return Generator(margs["ngf"], margs["kg"], margs["strg"], margs["padg"], margs["opg"], margs["latent_dim"],
                         margs["upsampling"])
    except ValueError as err:
        raise PipelineError(f"generator flags --ngf/--kg/--strg/--padg/--opg: {err}") from None


def build_networks(margs):
    """(generator, critic) from model_args; sizes that cannot make the patch size are a PipelineError."""
    if margs.get("arch", "paper") == "dcgan":
        return build_generator(margs), DCGANCritic(margs["ndf"], margs.get("patch_size", PATCH))
    g = build_generator(margs)
    try:
        d = Discriminator(margs["ndf"], margs["kd"], margs["strd"])
    except ValueError as err:
        raise PipelineError(f"critic flags --kd/--strd: {err}") from None
    return g, d


def make_private_critic(critic, optimizer, n_units, sample_rate, batch_units, noise_multiplier, max_grad_norm,
                        grad_sample_mode, generator=None, noise_generator=None):
    """Wrap the critic and its optimizer with Opacus; returns (critic, dp_optimizer, engine, sampler).

    Units are patches (privacy unit patch) or patients. The loader is Opacus's Poisson DPDataLoader over the
    n_units at rate q = sample_rate (batch / N, SPEC); its sampler draws the batches. make_private itself would derive
    q = 1 / len(loader) and the expected batch int(N q) from a plain loader: 1 / ceil(N / batch) and 31 for
    the paper's N = 41,000 and batch 32. So the loader is built at q here and the accountant's hook and the
    mean's denominator are set to q and batch: the mechanism run is the one the accountant counts.
    """
    engine = PrivacyEngine(accountant="rdp")
    loader = DPDataLoader(TensorDataset(torch.arange(n_units)), sample_rate=sample_rate, generator=generator)
    if grad_sample_mode == "bk":  # the critic stays bare; utils.bookkeeping writes the clipped sum into p.grad
        try:
            bookkeeping.check_supported(critic)
        except ValueError as err:
            raise PipelineError(f"--grad_sample_mode bk: {err}") from None
        optimizer = bookkeeping.BookkeepingDPOptimizer(
            optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            expected_batch_size=batch_units, loss_reduction="mean", generator=noise_generator)
        optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
        return critic, optimizer, engine, loader.batch_sampler
    private = engine.make_private(module=critic, optimizer=optimizer, data_loader=loader,
                                  noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                  poisson_sampling=False, grad_sample_mode=grad_sample_mode,
                                  noise_generator=noise_generator)
    critic, optimizer = private[0], private[1]  # ghost mode also returns a criterion, unused here
    critic.forbid_grad_accumulation()  # make_private does this only when it builds the Poisson loader itself
    optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    optimizer.expected_batch_size = batch_units
    return critic, optimizer, engine, loader.batch_sampler


@contextmanager
def critic_without_privacy_hooks(critic):
    """The bare critic (same parameters) with Opacus's per-sample machinery off, for gradients that are not
    released through the DP optimizer: the fake half of the strict critic loss and the generator's loss."""
    hooks = isinstance(critic, GradSampleHooks)  # hooks, functorch and ghost modes; "ew" works in forward()
    if hooks:
        critic.disable_hooks()
    try:
        yield critic._module if isinstance(critic, AbstractGradSampleModule) else critic
    finally:
        if hooks:
            critic.enable_hooks()


def critic_loss_terms(scores, real, loss):
    """Per-sample critic loss of scores of real (real=True) or generated samples; the critic's loss is their mean
    over both halves. wgan: -D(x) / D(G(z)) (the paper); hinge: relu(1 - D(x)) / relu(1 + D(G(z)));
    ns (non-saturating, the standard GAN loss on logits): softplus(-D(x)) / softplus(D(G(z)))."""
    if loss == "wgan":
        return -scores if real else scores
    if loss == "hinge":
        return F.relu(1 - scores) if real else F.relu(1 + scores)
    if loss == "ns":
        return F.softplus(-scores) if real else F.softplus(scores)
    raise ValueError(f"--loss {loss!r}: choose one of {', '.join(LOSSES)}")


def generator_loss(scores, loss):
    """-mean D(G(z)) (wgan, hinge) or mean softplus(-D(G(z))) (ns)."""
    return F.softplus(-scores).mean() if loss == "ns" else -scores.mean()


def diff_augment(x, shift=None):
    """DiffAugment (Zhao et al. 2020) for pairs: per sample, random flips of both axes and a translation of up to
    `shift` pixels (default 1/8 of the patch) with reflected borders, the same for image and label;
    differentiable, so the generator learns through it. Applied alike to real and generated pairs before the
    critic, it keeps a small critic from memorising the few patches it sees; under DP it is part of each sample's
    own term (clipped with it)."""
    n, size = len(x), x.shape[-1]
    if n == 0:
        return x
    shift = size // 8 if shift is None else shift
    flip = torch.rand(n, 2, device=x.device) < 0.5
    x = torch.where(flip[:, 0, None, None, None], x.flip(3), x)
    x = torch.where(flip[:, 1, None, None, None], x.flip(2), x)
    padded = F.pad(x, (shift, shift, shift, shift), mode="reflect")
    offsets = torch.randint(0, 2 * shift + 1, (2, n), device=x.device)
    rows = (torch.arange(size, device=x.device)[None] + offsets[0, :, None])[:, None, :, None]
    cols = (torch.arange(size, device=x.device)[None] + offsets[1, :, None])[:, None, None, :]
    padded = padded.gather(2, rows.expand(n, x.shape[1], size, padded.shape[3]))
    return padded.gather(3, cols.expand(n, x.shape[1], size, size))


def clamp_critic_weights(critic, clip_param_w):
    """WGAN weight clipping after every critic iteration (None: no clipping, for the other losses)."""
    if clip_param_w is None:
        return
    with torch.no_grad():
        for p in critic.parameters():
            p.clamp_(-clip_param_w, clip_param_w)


def _dp_backward(critic, optimizer, batch, per_sample_loss, blocks=None, max_physical_batch=None):
    """Per-sample gradients of per_sample_loss(D(x), rows)_i into the DP optimizer; returns the detached scores.
    blocks (patient-level DP) and max_physical_batch (bk engine only): see bookkeeping.clipped_gradient_sum.

    An empty Poisson batch is still one release (of pure noise): its per-sample gradients are set to an
    empty stack without a forward pass, which Opacus's clip_and_accumulate sums to zero.
    """
    ready_clipped = isinstance(optimizer, bookkeeping.BookkeepingDPOptimizer) or isinstance(
        critic, GradSampleModuleFastGradientClipping)  # p.grad holds the clipped sum, not per-sample gradients
    if len(batch) == 0:
        for p in optimizer.params:
            if ready_clipped:
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        if isinstance(optimizer, bookkeeping.BookkeepingDPOptimizer):
            optimizer.per_unit_norms = batch.new_zeros(0)
        return batch.new_zeros(0)
    if isinstance(optimizer, bookkeeping.BookkeepingDPOptimizer):
        scores, optimizer.per_unit_norms = bookkeeping.clipped_gradient_sum(
            critic, batch, per_sample_loss, optimizer.max_grad_norm, blocks, max_physical_batch)
        return scores
    if max_physical_batch is not None:
        raise ValueError("a physical batch size needs the bk engine")
    scores = critic(batch)
    if isinstance(critic, GradSampleModuleFastGradientClipping):
        # Ghost clipping: per-sample norms in a first backward pass, the clipped sum in a second one.
        DPTensorFastGradientClipping(critic, optimizer, per_sample_loss(scores, slice(0, len(batch))),
                                     "mean").backward()
    else:
        per_sample_loss(scores, slice(0, len(batch))).mean().backward()
    return scores.detach()


def private_critic_step(critic, optimizer, real, fake, clip_param_w, loss="wgan", augment=None,
                        patches_per_patient=None, max_physical_batch=None):
    """One strict DP-WGAN critic iteration on a fresh Poisson batch `real` and a generated batch `fake`.

    Update direction = (sum_i clip_C(grad l_real(real_i)) + sum_j clip_C(grad l_fake(fake_j)) + N(0, (noisem C)^2 I))
    / B, l the per-sample loss terms (critic_loss_terms; wgan: -D(real_i), D(fake_j)), B = the expected batch
    size (optimizer.expected_batch_size, which is also the fake batch's size): without clipping and noise, the
    gradient of the critic loss (wgan: mean D(fake) - mean D(real)). One backward pass, one noise draw, one
    accountant step at q = B / N. Then the optimizer steps and the weights are clamped (wgan). `augment`, if
    given, transforms every sample before the critic (diff_augment). max_physical_batch (bk engine): at most
    this many samples (whole patients) per forward and backward pass; the update is the same.

    Patient-level privacy (patches_per_patient = k): `real` holds k consecutive patches of each sampled patient;
    their per-sample gradients are averaged into one per-patient gradient before Opacus clips it, so each term
    i of the real sum is one patient, B is the expected number of patients, and removing a patient changes the
    noiseless update by at most C / B. The average (not the sum) keeps a patient's gradient on the scale of one
    patch's, so that one clipping norm suits both privacy units.
    Returns the detached (real, fake) scores and the step's diagnostics (dp_diagnostics).
    """
    optimizer.zero_grad()
    n_real, both = len(real), torch.cat([real, fake])
    k = patches_per_patient
    bk = isinstance(optimizer, bookkeeping.BookkeepingDPOptimizer)

    def loss_terms(scores, rows):  # the scores of both[rows]: real samples come first
        real_rows = torch.arange(rows.start, rows.stop, device=scores.device) < n_real
        return torch.where(real_rows, critic_loss_terms(scores, True, loss), critic_loss_terms(scores, False, loss))
    scores = _dp_backward(critic, optimizer, augment(both) if augment else both, loss_terms,
                          ((n_real, k), (len(fake), 1)) if k is not None and bk else None, max_physical_batch)
    if k is not None and not bk:
        average_real_gradients_by_patient(optimizer, len(real), k)
    if not optimizer.pre_step():  # clip, add noise, divide by B, accountant step
        raise RuntimeError("the DP optimizer skipped a step; nothing here asks it to")
    diagnostics = dp_diagnostics(critic, optimizer)
    optimizer.original_optimizer.step()
    clamp_critic_weights(critic, clip_param_w)
    return scores[:len(real)], scores[len(real):], diagnostics


def average_real_gradients_by_patient(optimizer, n_real, k):
    """Replace the per-sample gradients of n_real real patches (k consecutive ones per patient) by one mean
    gradient per patient, before the DP optimizer clips; the fake samples' rows stay as they are."""
    if n_real % k:
        raise RuntimeError(f"{n_real} real patches are not whole patients of {k} patches")
    for p in optimizer.params:
        g = p.grad_sample
        p.grad_sample = torch.cat([g[:n_real].reshape(n_real // k, k, *g.shape[1:]).mean(1), g[n_real:]])


def dp_diagnostics(critic, optimizer):
    """After the DP optimizer's pre_step: tensor [median per-sample gradient norm before clipping, fraction of
    samples clipped, ||noise|| / ||clipped sum||]. The noise is read back from p.grad = (clipped sum + noise) / B.
    Internal: computed on training samples without noise. A tensor on the critic's device, so that a GPU is not
    synchronised per step."""
    if isinstance(optimizer, bookkeeping.BookkeepingDPOptimizer):
        norms = optimizer.per_unit_norms
    elif isinstance(critic, GradSampleModuleFastGradientClipping):
        norms = critic.per_sample_gradient_norms
    else:
        norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=1) for g in optimizer.grad_samples], 1).norm(2, dim=1)
    scale = optimizer.expected_batch_size
    signal_sq = sum(p.summed_grad.square().sum() for p in optimizer.params)
    noise_sq = sum((p.grad * scale - p.summed_grad).square().sum() for p in optimizer.params)
    ratio = torch.where(signal_sq > 0, (noise_sq / signal_sq).sqrt(), torch.inf)  # no signal at all: inf
    if len(norms) == 0:
        return torch.cat([norms.new_full((2,), float("nan")), norms.new_full((1,), float("inf"))]).float()
    return torch.stack([norms.median(), (norms > optimizer.max_grad_norm).float().mean(), ratio]).detach().float()


def paper_critic_step(critic, optimizer, real, fake, clip_param_w):
    """One critic iteration of the authors' loop: a DP step on -D(real), then a DP step on D(fake), both
    accounted as subsampled Gaussian steps (the paper's count; see utils.privacy for the valid one)."""
    optimizer.zero_grad()
    real_scores = _dp_backward(critic, optimizer, real, lambda s, rows: -s)
    optimizer.step()
    diagnostics = dp_diagnostics(critic, optimizer)
    optimizer.zero_grad()
    fake_scores = _dp_backward(critic, optimizer, fake, lambda s, rows: s)
    optimizer.step()
    clamp_critic_weights(critic, clip_param_w)
    return real_scores, fake_scores, diagnostics


def plain_critic_step(critic, optimizer, real, fake, clip_param_w, loss="wgan", augment=None):
    """Non-private critic iteration: the mean of critic_loss_terms over the real and over the fake half (wgan:
    mean D(fake) - mean D(real)), one optimizer step, clamp (wgan)."""
    optimizer.zero_grad()
    augment = augment or (lambda x: x)
    fake_scores = critic(augment(fake))
    real_scores = critic(augment(real)) if len(real) else real.new_zeros(0)
    total = critic_loss_terms(fake_scores, False, loss).mean()
    if len(real):
        total = total + critic_loss_terms(real_scores, True, loss).mean()
    total.backward()
    optimizer.step()
    clamp_critic_weights(critic, clip_param_w)
    return real_scores.detach(), fake_scores.detach(), None


def make_optimizer(parameters, name, lr, beta1):
    """RMSprop (the paper's) or Adam with the GAN betas (beta1, 0.999)."""
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, betas=(beta1, 0.999))
    return torch.optim.RMSprop(parameters, lr=lr)


def update_ema(average, model, decay):
    """average <- decay average + (1 - decay) model for the weights; buffers (BatchNorm statistics) copied.
    Post-processing of the generator, which never sees real data: free under DP."""
    with torch.no_grad():
        for a, p in zip(average.parameters(), model.parameters()):
            a.lerp_(p, 1 - decay)
        for a, b in zip(average.buffers(), model.buffers()):
            a.copy_(b)


def generator_step(generator, critic, optimizer, batch_size, device, loss="wgan", augment=None):
    """loss_G = generator_loss(D(G(z))) (wgan: -mean D(G(z))); only the generator's parameters receive gradients
    (post-processing: the critic's hooks are off and its .grad is left untouched). Returns the detached scores."""
    z = torch.randn(batch_size, generator.latent_dim, device=device)
    with critic_without_privacy_hooks(critic) as bare:
        fake = generator(z)
        scores = bare(augment(fake) if augment else fake)
        optimizer.zero_grad()
        generator_loss(scores, loss).backward(inputs=list(generator.parameters()))
    optimizer.step()
    return scores.detach()


# ---- checkpoints ----
def checkpoint_path(trial, epoch):
    return gan_model_dir(trial) / f"epoch_{epoch}.pth"


def checkpoint_epochs(trial):
    """Epochs with a checkpoint in the trial's model folder, ascending."""
    folder = gan_model_dir(trial)
    found = [re.fullmatch(r"epoch_(\d+)\.pth", p.name) for p in folder.glob("epoch_*.pth")] if folder.is_dir() else []
    return sorted(int(m.group(1)) for m in found if m)


def load_checkpoint(path, device="cpu"):
    """A checkpoint written by run_gan.py (plain tensors and containers: loads with weights_only)."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (OSError, RuntimeError, EOFError) as err:
        raise PipelineError(f"checkpoint {path} cannot be read: {err}") from None


def rng_states(sampler_generator, noise_generator):
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "noise": noise_generator.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]),
                      float(np_state[4])),
            "python": random.getstate(), "sampler": sampler_generator.get_state()}


def restore_rng_states(states, sampler_generator, noise_generator):
    torch.set_rng_state(states["torch"])
    noise_generator.set_state(states["noise"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy(), int(pos), int(has_gauss), float(cached)))
    random.setstate(states["python"])
    sampler_generator.set_state(states["sampler"])


def start_from_public(generator, critic, path, margs, patches_sha256, skull_stripped):
    """Load the generator (its EMA where the checkpoint has one; the critic as trained) and the critic of a
    run_gan.py checkpoint trained on PUBLIC data (--init_from): a warm start that costs no privacy only because that
    data is not the patients'. Refused where the code can see otherwise (a checkpoint of this work folder, or of a
    run whose config.json records these very patches: patches_sha256); a copy elsewhere it cannot see. The networks
    must be the same (model_args), and so must the data preparation (skull_stripped: this run's patches); the
    optimizers start afresh. Returns the checkpoint's sha256."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"--init_from {path}: no such checkpoint (a run_gan.py epoch_<e>.pth of a run on public "
                            f"data)")
    if path.resolve().parent.parent == (config.WORK_DIR / "models").resolve():
        raise PipelineError(f"--init_from {path}: that GAN trained on this work folder's patches, the patients this "
                            f"run protects; starting from it would spend privacy the accountant does not count (a "
                            f"public start comes from a run in another work folder, on public data)")
    source = path.resolve().parent.parent.parent / "results" / path.resolve().parent.name / "config.json"
    source_config = load_json(source, "trial config") if source.is_file() else {}
    if source_config and stripped_of(source_config) != skull_stripped:
        raise PipelineError(f"--init_from {path}: its run ({source}) trained on "
                            f"{preparation_name(stripped_of(source_config))} patches, this run's are "
                            f"{preparation_name(skull_stripped)}; train the public GAN on data prepared the same way")
    if source_config.get("patches_sha256") == patches_sha256:
        raise PipelineError(f"--init_from {path}: its run ({source}) trained on the same patches file as this run, the "
                            f"patients this run protects; starting from it would spend privacy the accountant does "
                            f"not count")
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict) or not {"generator", "discriminator", "model_args"} <= checkpoint.keys():
        raise PipelineError(f"--init_from {path}: not a run_gan.py checkpoint (no generator, discriminator and "
                            f"model_args)")
    theirs = checkpoint["model_args"]
    different = [f"{k} {theirs.get(k)!r} (this run: {v!r})" for k, v in margs.items() if theirs.get(k) != v]
    if different:
        raise PipelineError(f"--init_from {path}: its networks differ from this run's: {'; '.join(different)}")
    generator.load_state_dict(checkpoint.get("generator_ema") or checkpoint["generator"])
    critic.load_state_dict(checkpoint["discriminator"])
    return file_sha256(path)


# ---- one training run ----
class GanTrial:
    """Everything one trial's training loop needs: networks, optimizers, privacy engine, sampler and outputs."""

    def __init__(self, args):
        self.args = args
        self.validate_flags(args)
        self.model_dir, self.results_dir = gan_model_dir(args.trial), gan_results_dir(args.trial)
        self.start_epoch = self._start_epoch()  # repairs what a stopped run left; refuses a trial it may not touch
        self.resuming = self.start_epoch > 0
        img, label, patients, self.skull_stripped = read_patches()
        self.data = scale_pairs(img, label, args.label_scale)
        # Audit canaries drawn in join the training set as units of their own (utils/canaries.py); the
        # accounting below counts all of them (n_accounted).
        self.canaries = self._audit_canaries(img, label) if args.audit_canaries else None
        if self.canaries is not None:
            included = self.canaries["included"]
            self.data = torch.cat([self.data, scale_pairs(self.canaries["img"][included],
                                                          self.canaries["label"][included], args.label_scale)])
        del img, label
        self.n_samples = len(self.data)
        self.patient_group = largest_patient_group(patients)
        # The privacy unit: patches, or patients (each sampled patient gives k patches per critic iteration).
        self.patches_of = self._patient_patches(patients) if args.privacy_unit == "patient" else None
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
        self.device = resolve_device(args.device)
        torch.manual_seed(args.seed)
        np.random.seed(args.seed)
        random.seed(args.seed)
        self.model_args = model_args(args)
        self.generator, self.critic = build_networks(self.model_args)
        self.generator_updates, self.log_rows = 0, []
        self.patches_sha256 = file_sha256(patches_path("train"))
        if self.resuming:
            self._check_resumed_settings()
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
        opt_d = make_optimizer(self.critic.parameters(), args.optimizer, args.lrd, args.beta1)
        # The loss and the augmentation go into every critic and generator step; WGAN alone clips weights.
        self.step_options = dict(loss=args.loss, augment=diff_augment if args.diffaugment else None)
        self.autocast = functools.partial(torch.autocast, self.device.type, torch.bfloat16, enabled=args.amp)
        self.weight_clip = args.clip_param_W if args.loss == "wgan" else None
        checkpoint = self._load_checkpoint(opt_d) if self.resuming else None
        if self.private:
            self.d, self.opt_d, self.engine, sampler = make_private_critic(
                self.critic, opt_d, self.n_units, self.sample_rate, self.batch_units, args.noisem,
                args.max_norm_dp, args.grad_sample_mode, self.sampler_generator, self.noise_generator)
            self.critic_step_fn = paper_critic_step if args.dp_mode == "paper" else functools.partial(
                private_critic_step, **self.step_options,
                patches_per_patient=args.patches_per_patient_step if self.patches_of else None,
                max_physical_batch=args.max_physical_batch)
        else:
            self.d, self.opt_d, self.engine = self.critic, opt_d, None
            sampler = poisson_sampler(self.n_units, self.sample_rate, self.sampler_generator)
            self.critic_step_fn = functools.partial(plain_critic_step, **self.step_options)
        self._check_writable()  # nothing is written before this point (but the repairs of _start_epoch)
        if checkpoint is not None:
            if self.private:
                self.engine.accountant.history = [tuple(h) for h in checkpoint["accountant"]["history"]]
            restore_rng_states(checkpoint["rng"], self.sampler_generator, self.noise_generator)
        else:
            self._write_config()
        self.indices = patient_batches(sampler, self.patches_of, args.patches_per_patient_step,
                                       self.sampler_generator) if self.patches_of else endless(sampler)

    # -- setup helpers --
    @staticmethod
    def validate_flags(args):
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
        for ok, message in checks:
            if not ok:
                raise PipelineError(message)
        try:
            privacy.check_settings(noisem=args.noisem, batch_size=args.batch_size, n_discr=args.n_discr,
                                   dp_mode=args.dp_mode)
        except ValueError as err:
            raise PipelineError(str(err)) from None

    def _patient_patches(self, patients):
        """Patch indices per patient for --privacy_unit patient, with its flags checked against the patches file."""
        args, path = self.args, patches_path("train")
        if patients is None:
            raise PipelineError(f"--privacy_unit patient: the patches file {path} has no `patient` array (which "
                                f"patch belongs to whom); extract it again with extract_patches.py")
        if args.dp_mode != "strict" or args.grad_sample_mode == "ghost":
            raise PipelineError(f"--privacy_unit patient needs --dp_mode strict and per-sample gradients to average "
                                f"by patient: --grad_sample_mode bk, hooks, functorch or ew "
                                f"(not {args.grad_sample_mode})")
        patches_of = patient_patches(patients)
        fewest = min(len(p) for p in patches_of)
        if not 1 <= args.patches_per_patient_step <= fewest:
            raise PipelineError(f"--patches_per_patient_step {args.patches_per_patient_step}: must lie between 1 "
                                f"and {fewest}, the fewest patches any patient has in {path}")
        if args.max_physical_batch is not None and args.max_physical_batch < args.patches_per_patient_step:
            raise PipelineError(f"--max_physical_batch {args.max_physical_batch}: a physical batch holds whole "
                                f"patients, at least --patches_per_patient_step {args.patches_per_patient_step}")
        if not 1 <= args.batch_patients <= len(patches_of):
            raise PipelineError(f"--batch_patients {args.batch_patients}: must lie between 1 and the "
                                f"{len(patches_of)} training patients in {path}")
        return patches_of

    def _audit_canaries(self, img, label):
        """The trial's canaries: made and drawn now (saved with the config), or on --resume read back."""
        path = canaries_path(self.results_dir)
        if self.resuming:
            return load_canaries(path)
        seed = secrets.randbits(64) if self.args.secure_rng else [self.args.seed, 7]
        canaries = make_canaries(img, label, self.args.audit_canaries, np.random.default_rng(seed))
        print(f"audit canaries: {len(canaries['included'])} made, {int(canaries['included'].sum())} included in the "
              f"training set (which ones: {path}, internal); this run's data are for the audit only and are never "
              f"released", flush=True)
        return canaries

    def _start_epoch(self):
        """The epoch this run starts at: 0 for a new trial and for one whose run stopped in epoch 0 (it starts again,
        with or without --resume, so that a requeued job runs); with --resume the epoch after the newest complete
        one. An epoch is complete once its checkpoint is written: end_epoch writes it last, after the epoch's log
        row and samples. Repairs what a stopped run left: its temporary files are removed, and the checkpoint of an
        epoch without a log row (versions that wrote the checkpoint first) is removed and the epoch trained again.
        Refuses to start over a trial with a complete epoch."""
        trial, folders = self.args.trial, (self.model_dir, self.results_dir)
        if not any(folder.exists() for folder in folders):
            if self.args.resume:
                raise PipelineError(f"--resume: trial {trial!r} has nothing to resume (no folder {self.model_dir} or "
                                    f"{self.results_dir}); start it without --resume")
            return 0
        epochs, log_path = checkpoint_epochs(trial), self.results_dir / "log.csv"
        logged = [row["epoch"] for row in read_log(log_path)]
        if epochs and not logged and epochs[-1] > 0:
            raise PipelineError(f"trial {trial!r} has checkpoints up to epoch {epochs[-1]} but no {log_path}, which "
                                f"says which epochs are complete; restore it, or delete the trial to start again")
        unlogged = []  # the newest checkpoints without a log row: their epochs are not complete
        while epochs and epochs[-1] not in logged:
            unlogged.insert(0, epochs.pop())
        if epochs and not self.args.resume:
            raise PipelineError(f"trial {trial!r} exists already ({self.model_dir}, epochs up to {epochs[-1]}); pass "
                                f"--resume to continue it or choose another --trial (nothing was written)")
        for folder in folders:
            removed = remove_partial_files(folder)
            if removed:
                print(f"trial {trial!r}: removed {', '.join(removed)} from {folder}: partly written when a run was "
                      f"stopped", flush=True)
        for epoch in unlogged:
            self._remove_unlogged(epoch, epochs[-1] if epochs else None)
        if not epochs:
            print(f"trial {trial!r} has no complete epoch (its run stopped in epoch 0): it starts again from epoch 0",
                  flush=True)
            return 0
        if logged[-1] > epochs[-1]:
            print(f"--resume: epoch {epochs[-1] + 1} of trial {trial!r} was left half-done (its log row and samples "
                  f"were written, its checkpoint not): it is trained again from the checkpoint of epoch {epochs[-1]}",
                  flush=True)
        return epochs[-1] + 1

    def _remove_unlogged(self, epoch, previous):
        """Remove the checkpoint of a half-done epoch. Not kept: its epoch is trained again with the restored RNG
        states, so the same batches and noise draws; two models of one noise draw, computed even slightly
        differently (another engine, --amp, device), would release a noise-free difference the accountant does not
        count."""
        path = checkpoint_path(self.args.trial, epoch)
        path.unlink()
        since = f"from the checkpoint of epoch {previous}" if previous is not None else "from the start"
        print(f"trial {self.args.trial!r}: epoch {epoch} was left half-done (its checkpoint has no row in log.csv: the "
              f"run was stopped between them); its checkpoint {path} is removed and epoch {epoch} is trained again "
              f"{since}", flush=True)

    def _check_resumed_settings(self):
        """--resume: the trial must have been run with these flags, on this patches file."""
        trial, config_path = self.args.trial, self.results_dir / "config.json"
        if not config_path.is_file():
            raise PipelineError(f"--resume: trial {trial!r} has checkpoints but no {config_path}, which records its "
                                f"settings; restore it, or delete the trial to start again")
        stored = load_json(config_path, "trial config")
        ran = {**FLAGS_ADDED_LATER, **stored["args"]}
        different = [f"--{k} {v!r} (the trial has {ran.get(k)!r})" for k, v in vars(self.args).items()
                     if k not in RESUMABLE_CHANGES and ran.get(k) != v]
        stored_size = stored.get("config", {}).get("PATCH_SIZE", PATCH)
        if stored_size != config.PATCH_SIZE:
            different.append(f"config.PATCH_SIZE {config.PATCH_SIZE} (the trial has {stored_size})")
        if stored.get("n_samples") != self.n_samples:
            different.append(f"the patches file now has {self.n_samples} patches (the trial had {stored['n_samples']})")
        recorded = stored.get("patches_sha256")
        if recorded and recorded != self.patches_sha256:
            different.append(f"the patches file {patches_path('train')} has changed since the trial started (sha256 "
                             f"{self.patches_sha256[:12]}..., config.json records {recorded[:12]}...): training on it "
                             f"would mix two data sets in one model and one epsilon; restore that file or start a "
                             f"new --trial")
        if different:
            raise PipelineError(f"--resume: trial {trial!r} was started with other settings: {'; '.join(different)}")

    def _load_checkpoint(self, opt_d):
        """Networks, optimizers, generator updates and log rows of the newest checkpoint; returns it."""
        # On the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest to the networks' device.
        checkpoint = load_checkpoint(checkpoint_path(self.args.trial, self.start_epoch - 1))
        self.generator.load_state_dict(checkpoint["generator"])
        if self.generator_ema is not None:
            self.generator_ema.load_state_dict(checkpoint["generator_ema"])
        self.critic.load_state_dict(checkpoint["discriminator"])
        self.opt_g.load_state_dict(checkpoint["opt_g"])
        opt_d.load_state_dict(checkpoint["opt_d"])
        self.generator_updates = checkpoint["accountant"]["generator_updates"]
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

    # -- privacy --
    def accounted_steps(self):
        return sum(h[2] for h in self.engine.accountant.history) if self.private else 0

    def valid_history(self):
        """The accountant history that is a valid bound for the loop run (strict: the DP optimizer's own)."""
        if self.args.dp_mode == "strict":
            return self.engine.accountant.history
        return privacy.valid_paper_history(self.args.noisem, self.sample_rate, self.generator_updates,
                                           self.args.n_discr)

    def epsilon(self, prv=False):
        """(epsilon as accounted by the DP optimizer's hook, valid RDP epsilon[, valid PRV epsilon]); inf for a
        non-private run. In paper mode the first is the paper's count, not a valid bound."""
        if not self.private:
            return (math.inf,) * (3 if prv else 2)
        counted = privacy.epsilon_from_history(self.engine.accountant.history, self.delta)
        valid = self.valid_history()
        strict = self.args.dp_mode == "strict"
        values = (counted, counted if strict else privacy.epsilon_from_history(valid, self.delta))
        return values + (privacy.epsilon_from_history(valid, self.delta, "prv"),) if prv else values

    def progress(self):
        self.check_finite()
        means = self.epoch_means()
        counted, valid = self.epsilon()
        shown = {"eps": f"{valid:.3f}"} if self.args.dp_mode == "strict" else \
            {"eps_valid": f"{valid:.3g}", "eps_paper_count(invalid)": f"{counted:.3f}"}
        return {"loss_d": f"{means['loss_d']:.4f}", "loss_g": f"{means['loss_g']:.4f}", **shown}

    def per_patient(self):
        group = 1 if self.patches_of else self.patient_group  # patient-level: the guarantee is per patient
        return privacy.group_privacy(self.epsilon()[1], self.delta, group)

    # -- end of an epoch: checkpoint, log, figures --
    def end_epoch(self):
        epoch = self.epoch
        # The last update may have broken a network without any loss showing it yet: never save that.
        self.check_finite()
        self._stop_unless(bool(torch.isfinite(torch.cat([p.detach().flatten() for p in self.parameters()])).all()),
                          "network weights")
        epsilon, epsilon_valid, epsilon_prv = self.epsilon(prv=True)
        row = {"epoch": epoch, **self.epoch_means(), "epsilon": epsilon, "epsilon_valid": epsilon_valid,
               "epsilon_valid_prv": epsilon_prv, "steps": self.accounted_steps(), "seconds": time.time() - self.started}
        checkpoint = {  # the state at the epoch's end, RNG states included, taken before anything else runs
            "epoch": epoch, "generator": self.generator.state_dict(), "discriminator": self.critic.state_dict(),
            "generator_ema": None if self.generator_ema is None else self.generator_ema.state_dict(),
            "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
            "accountant": {"history": list(self.engine.accountant.history) if self.private else [],
                           "generator_updates": self.generator_updates, "sample_rate": self.sample_rate,
                           "delta": self.delta, "dp_mode": self.args.dp_mode},
            "rng": rng_states(self.sampler_generator, self.noise_generator), "model_args": self.model_args}
        # The checkpoint is written last and commits the epoch: a run stopped before it leaves at most the epoch's
        # log row and figures, which --resume replaces by training the epoch again from the previous checkpoint.
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
        counted = "" if self.args.dp_mode == "strict" else f" (the paper's count, not a valid bound: {epsilon:.4g})"
        print(f"epoch {epoch}/{self.args.epochs - 1} | internal, not covered by epsilon: loss_d {row['loss_d']:.5f} "
              f"loss_g {row['loss_g']:.5f} W {row['wasserstein']:.5f} D(x) {row['d_real']:.4f} "
              f"D(G(z)) {row['d_fake']:.4f}{describe_diagnostics(row)} | per patch: epsilon {epsilon_valid:.4g} "
              f"(RDP), {epsilon_prv:.4g} (PRV), "
              f"delta {self.delta:.3g}{counted} | per patient: {describe_group_privacy(self.per_patient())} | "
              f"steps {row['steps']} | {row['seconds']:.1f} s", flush=True)
        return row


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


# ---- log and figures ----
def write_log(path, rows):
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: row[k] for k in LOG_COLUMNS})

    atomic_write(path, write)


def read_log(path):
    """log.csv rows with numbers as numbers ("inf" epsilon of a non-private run included)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: (int(v) if k in ("epoch", "steps") else float(v)) for k, v in row.items()} for row in rows]


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
