"""The GAN's steps (utils/gan_steps.py) on a tiny critic with a fixed batch: the private critic step (clipping, noise,
accounting, every per-sample gradient engine, physical batches, patients), the generator step, losses, DiffAugment
and EMA."""

import copy

import pytest
import torch

from model import Discriminator, Generator
from utils import gan_steps

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing", "ignore:Secure RNG turned off")


# ---- the mechanism, on a tiny critic with a fixed batch ----
def tiny_critic(zero_weights=False):
    """A tiny critic, an untouched copy of it and 16 random inputs."""
    torch.manual_seed(0)
    d = Discriminator(ndf=4)
    if zero_weights:
        for p in d.parameters():
            torch.nn.init.zeros_(p)
    return d, copy.deepcopy(d), torch.randn(16, 2, 96, 96)


def privatise(d, data, noise_multiplier, max_grad_norm, batch_size=8, mode="hooks"):
    opt = torch.optim.SGD(d.parameters(), lr=1.0)  # the step is minus the gradient the optimizer receives
    return gan_steps.make_private_critic(d, opt, len(data), batch_size / len(data), batch_size, noise_multiplier,
                                   max_grad_norm, mode)


def per_sample_gradients(critic, samples, sign):
    params = list(critic.parameters())
    return [torch.autograd.grad(sign * critic(x[None]).mean(), params) for x in samples]


def global_norm(grads):
    return torch.sqrt(sum((g ** 2).sum() for g in grads))


@pytest.mark.parametrize("mode", gan_steps.GRAD_SAMPLE_MODES)
def test_noiseless_private_step_is_the_clipped_real_and_fake_gradients_summed_over_the_expected_batch(mode):
    batch_size = 8
    d, bare, data = tiny_critic()
    real, fake = data[:5], data[8:16]  # 5 real samples (a Poisson batch), B = 8 fake ones; divisor B = 8
    per_sample = per_sample_gradients(bare, real, -1) + per_sample_gradients(bare, fake, +1)
    norms = torch.stack([global_norm(g) for g in per_sample])
    max_norm = norms.median().item()  # some samples of each half are clipped, some are not
    assert (norms[:5] > max_norm).any() and (norms[5:] > max_norm).any() and (norms[5:] < max_norm).any()
    expected = []
    for i, p in enumerate(bare.parameters()):
        clipped = sum(g[i] * min(1.0, max_norm / (n.item() + 1e-6)) for g, n in zip(per_sample, norms))
        expected.append(p.detach() - clipped / batch_size)

    private, dp_opt, engine, _ = privatise(d, data, 0.0, max_norm, batch_size, mode)
    real_scores, fake_scores, diagnostics = gan_steps.private_critic_step(private, dp_opt, real, fake, clip_param_w=1e6)
    for p, e in zip(d.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-4, atol=1e-5)
    assert engine.accountant.history == [(0.0, batch_size / len(data), 1)]  # one step for real and fake together
    assert real_scores.shape == (5,) and fake_scores.shape == (8,)
    median, clipped, noise_to_signal = diagnostics.tolist()
    assert median == pytest.approx(norms.median().item(), rel=1e-3)
    assert clipped == pytest.approx((norms > max_norm).float().mean().item())
    assert noise_to_signal == pytest.approx(0.0, abs=1e-5)


def test_private_critic_samples_and_accounts_at_rate_batch_over_n_when_batch_does_not_divide_n():
    d, _, data = tiny_critic()
    private, dp_opt, engine, sampler = privatise(d, data[:13], 1.0, 1.0, batch_size=4)
    assert sampler.sample_rate == 4 / 13 and dp_opt.expected_batch_size == 4
    gan_steps.private_critic_step(private, dp_opt, data[:4], data[8:11], clip_param_w=1.0)
    assert engine.accountant.history == [(1.0, 4 / 13, 1)]


@pytest.mark.parametrize("mode", ["bk", "hooks"])
@pytest.mark.parametrize("n_real", [5, 0])
def test_private_step_noise_has_sd_sigma_c_over_b_and_an_empty_batch_is_one_counted_step(n_real, mode):
    sigma, max_norm, batch_size = 2.0, 0.5, 8
    # All-zero weights: every gradient is exactly zero, so the step is the noise / B alone.
    d, _, data = tiny_critic(zero_weights=True)
    private, dp_opt, engine, _ = privatise(d, data, sigma, max_norm, batch_size, mode)
    diagnostics = gan_steps.private_critic_step(private, dp_opt, data[:n_real], data[8:11], clip_param_w=1e6)[2]
    step = torch.cat([p.detach().flatten() for p in d.parameters()])
    assert len(step) > 40000
    sd = sigma * max_norm / batch_size
    assert step.std().item() == pytest.approx(sd, rel=0.02) and abs(step.mean().item()) < 0.05 * sd
    assert diagnostics[2] == float("inf")  # every gradient is zero: all noise, no signal
    assert engine.accountant.history == [(sigma, batch_size / len(data), 1)]


def test_weights_are_clamped_after_a_critic_step():
    d, _, data = tiny_critic()
    private, dp_opt, _, _ = privatise(d, data, 1.0, 1.0)
    gan_steps.private_critic_step(private, dp_opt, data[:5], data[8:11], clip_param_w=0.003)
    assert max(p.abs().max().item() for p in d.parameters()) == pytest.approx(0.003)


def test_generator_step_leaves_the_critic_alone():
    d, _, data = tiny_critic()
    private, dp_opt, engine, _ = privatise(d, data, 1.0, 1.0)
    gan_steps.private_critic_step(private, dp_opt, data[:5], data[8:11], clip_param_w=1.0)
    critic_state = [(p.detach().clone(), p.grad.clone()) for p in d.parameters()]
    g = Generator(ngf=4)
    g_before = [p.detach().clone() for p in g.parameters()]
    opt_g = torch.optim.RMSprop(g.parameters(), lr=1e-3)
    gan_steps.generator_step(g, private, opt_g, 4, "cpu")
    for p, (weight, grad) in zip(d.parameters(), critic_state):
        assert torch.equal(p.detach(), weight) and torch.equal(p.grad, grad)
        assert not isinstance(p.grad_sample, torch.Tensor) or p.grad_sample.shape[0] == 8  # from the critic step
    assert all(not torch.equal(p.detach(), b) for p, b in zip(g.parameters(), g_before))
    assert len(engine.accountant.history) == 1 and engine.accountant.history[0][2] == 1


def test_a_private_step_in_physical_batches_is_the_one_pass_update_with_the_same_noise_draw():
    d, _, data = tiny_critic()
    updates = []
    for max_physical_batch in (None, 4):
        critic = copy.deepcopy(d)
        start = [p.detach().clone() for p in critic.parameters()]
        private, dp_opt, _, _ = gan_steps.make_private_critic(critic, torch.optim.SGD(critic.parameters(), lr=1.0),
                                                        len(data), 8 / len(data), 8, 1.3, 0.05, "bk",
                                                        noise_generator=torch.Generator().manual_seed(5))
        gan_steps.private_critic_step(private, dp_opt, data[:5], data[8:16], clip_param_w=None, loss="hinge",
                                max_physical_batch=max_physical_batch)
        updates.append(torch.cat([(p.detach() - s).flatten() for p, s in zip(critic.parameters(), start)]))
    torch.testing.assert_close(updates[1], updates[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", [m for m in gan_steps.GRAD_SAMPLE_MODES if m != "hooks"])
def test_every_engine_gives_the_reference_update_with_the_same_noise_draw(mode):
    """The guarantee must not depend on the speed path: with one fixed noise draw, every per-sample gradient engine
    gives the clipped, noised update of the reference engine (hooks) to float tolerance."""
    d, _, data = tiny_critic()
    real, fake = data[:5], data[8:16]
    updates = []
    for engine in ("hooks", mode):
        critic = copy.deepcopy(d)
        start = [p.detach().clone() for p in critic.parameters()]
        opt = torch.optim.SGD(critic.parameters(), lr=1.0)
        private, dp_opt, _, _ = gan_steps.make_private_critic(critic, opt, len(data), 8 / len(data), 8, 1.3, 0.05,
                                                              engine, noise_generator=torch.Generator().manual_seed(5))
        gan_steps.private_critic_step(private, dp_opt, real, fake, clip_param_w=None, loss="ns")
        updates.append(torch.cat([(p.detach() - s).flatten() for p, s in zip(critic.parameters(), start)]))
    torch.testing.assert_close(updates[1], updates[0], rtol=1e-4, atol=1e-5)


# ---- patient-level privacy: the step of averaged patients ----
@pytest.mark.parametrize("mode", ["hooks", "bk"])
def test_patient_step_clips_each_patients_mean_gradient_and_one_patient_moves_it_at_most_c_over_b(mode):
    k, b, max_norm = 2, 4, 0.05
    d, bare, data = tiny_critic()
    real, fake = data[:6], data[8:12]  # 3 sampled patients of k = 2 patches; b = 4 fake samples
    real_grads = per_sample_gradients(bare, real, -1)
    patient_grads = [[(a + c) / 2 for a, c in zip(real_grads[i], real_grads[i + 1])] for i in (0, 2, 4)]
    units = patient_grads + per_sample_gradients(bare, fake, +1)
    norms = torch.stack([global_norm(g) for g in units])
    assert (norms > max_norm).any()

    def update(real_batch):
        critic = copy.deepcopy(d)
        start = [p.detach().clone() for p in critic.parameters()]
        private, dp_opt, engine, _ = privatise(critic, data, 0.0, max_norm, b, mode)
        gan_steps.private_critic_step(private, dp_opt, real_batch, fake, clip_param_w=1e6, patches_per_patient=k)
        assert engine.accountant.history == [(0.0, b / len(data), 1)]
        return torch.cat([(p.detach() - s).flatten() for p, s in zip(critic.parameters(), start)])

    expected = -sum(torch.cat([g.flatten() for g in unit]) * min(1.0, max_norm / (n.item() + 1e-6))
                    for unit, n in zip(units, norms)) / b
    with_all = update(real)
    torch.testing.assert_close(with_all, expected, rtol=1e-4, atol=1e-6)
    without_one = update(real[2:])  # the first patient removed
    assert (with_all - without_one).norm().item() <= max_norm / b * (1 + 1e-4)


# ---- the recipe's losses, DiffAugment and EMA ----
def test_critic_and_generator_losses_on_hand_made_scores():
    s = torch.tensor([-2.0, 0.0, 3.0])
    assert torch.equal(gan_steps.critic_loss_terms(s, True, "wgan"), -s)
    assert torch.equal(gan_steps.critic_loss_terms(s, False, "wgan"), s)
    assert gan_steps.critic_loss_terms(s, True, "hinge").tolist() == [3.0, 1.0, 0.0]
    assert gan_steps.critic_loss_terms(s, False, "hinge").tolist() == [0.0, 1.0, 4.0]
    torch.testing.assert_close(gan_steps.critic_loss_terms(s, True, "ns"), torch.log1p(torch.exp(-s)))
    torch.testing.assert_close(gan_steps.generator_loss(s, "ns"), torch.log1p(torch.exp(-s)).mean())
    assert gan_steps.generator_loss(s, "hinge") == -s.mean()


@pytest.mark.parametrize("loss", ["ns", "hinge"])
def test_noiseless_private_step_clips_the_per_sample_terms_of_other_losses(loss):
    batch_size = 8
    d, bare, data = tiny_critic()
    real, fake = data[:5], data[8:16]
    params = list(bare.parameters())
    per_sample = [torch.autograd.grad(gan_steps.critic_loss_terms(bare(x[None]), is_real, loss).sum(), params)
                  for xs, is_real in ((real, True), (fake, False)) for x in xs]
    norms = torch.stack([global_norm(g) for g in per_sample])
    max_norm = norms[norms > 0].median().item()
    expected = [p.detach() - sum(g[i] * min(1.0, max_norm / (n.item() + 1e-6)) for g, n in zip(per_sample, norms))
                / batch_size for i, p in enumerate(params)]
    private, dp_opt, _, _ = privatise(d, data, 0.0, max_norm, batch_size)
    gan_steps.private_critic_step(private, dp_opt, real, fake, clip_param_w=None, loss=loss)
    for p, e in zip(d.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-4, atol=1e-5)


def test_diff_augment_moves_image_and_label_together():
    torch.manual_seed(0)
    x = torch.rand(16, 1, 96, 96).repeat(1, 2, 1, 1)
    out = gan_steps.diff_augment(x)
    assert out.shape == x.shape and torch.equal(out[:, 0], out[:, 1])
    assert not torch.equal(out, x)
    assert gan_steps.diff_augment(x[:0]).shape == (0, 2, 96, 96)


def test_ema_averages_weights_and_copies_buffers():
    model, average = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        model.weight.fill_(1.0)
        average.weight.fill_(0.0)
        model.running_mean.fill_(5.0)
    gan_steps.update_ema(average, model, 0.9)
    torch.testing.assert_close(average.weight, torch.full((3,), 0.1))
    assert torch.equal(average.running_mean, model.running_mean)
