"""One step of DP-WGAN training, as free functions a test can call with tensors: the private and plain critic
steps with their Opacus wiring, the generator step, the losses and what goes with them (docs/method.md, "The DP-WGAN").

Privacy: only the critic sees real data. Its gradient is clipped per sample to max_norm_dp (by
utils.bookkeeping, engine bk, or by Opacus's engines); Opacus's DP optimizer adds Gaussian noise noisem x
max_norm_dp, divides by the expected batch size and counts one accountant step per noisy step. Batches are
Poisson samples at rate batch / N (utils.gan_data).
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

import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import AbstractGradSampleModule, GradSampleHooks, GradSampleModuleFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch.utils.data import TensorDataset

from utils import bookkeeping
from utils.common import PipelineError

# Per-sample clipping engines: Opacus's four, and bk (utils/bookkeeping.py: book-keeping with mixed ghost norms).
GRAD_SAMPLE_MODES = ("bk", "hooks", "functorch", "ew", "ghost")
LOSSES = ("wgan", "hinge", "ns")
OPTIMIZERS = ("rmsprop", "adam")
# Opacus registers full backward hooks on the critic's layers; the first layer's input (the data) needs no
# gradient, which PyTorch reports on every run. It is expected and harmless here.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect")


def make_private_critic(critic, optimizer, n_units, sample_rate, batch_units, noise_multiplier, max_grad_norm,
                        grad_sample_mode, generator=None, noise_generator=None):
    """Wrap the critic and its optimizer with Opacus; returns (critic, dp_optimizer, engine, sampler).

    Units are patches (privacy unit patch) or patients. The loader is Opacus's Poisson DPDataLoader over the
    n_units at rate q = sample_rate (batch / N); its sampler draws the batches. make_private itself would derive
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
