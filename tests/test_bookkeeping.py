"""The bk per-sample clipping engine (utils/bookkeeping.py) against per-sample gradients taken one sample at a time."""

import contextlib
import copy

import pytest
import torch
from torch import nn

from model import DCGANCritic, Discriminator
from utils import bookkeeping


def unit_gradients(critic, batch, sign, k=1):
    """Each unit's gradient of the mean of its k samples' terms sign * D(x), one autograd call per unit."""
    params = list(critic.parameters())
    return [torch.autograd.grad(sign * critic(batch[i:i + k]).mean(), params) for i in range(0, len(batch), k)]


def flat(grads):
    return torch.cat([g.flatten() for g in grads])


def expected_clipped_sum(units, max_norm):
    norms = torch.stack([flat(u).norm() for u in units])
    return sum(flat(u) * min(1.0, max_norm / (n.item() + 1e-6)) for u, n in zip(units, norms)), norms


def wgan_terms(n_real):
    """-D(x) for the first n_real samples, D(x) for the others (scores of batch[rows])."""
    return lambda s, rows: torch.where(torch.arange(rows.start, rows.stop) < n_real, -s, s)


@pytest.mark.parametrize("network", ["paper", "dcgan"])
@pytest.mark.parametrize("norms", ["mixed", "ghost", "materialised"])
def test_clipped_sum_and_norms_equal_those_of_per_sample_gradients(network, norms, monkeypatch):
    if norms != "mixed":  # every layer through one of the two paths; mixed: the paper critic uses both
        monkeypatch.setattr(bookkeeping, "uses_ghost_norm", lambda *shape: norms == "ghost")
    torch.manual_seed(0)
    critic = Discriminator(ndf=4) if network == "paper" else DCGANCritic(ndf=4)
    batch = torch.randn(7, 2, 96, 96)
    units = unit_gradients(copy.deepcopy(critic), batch[:3], -1) + unit_gradients(copy.deepcopy(critic), batch[3:], 1)
    max_norm = torch.stack([flat(u).norm() for u in units]).median().item()  # some clipped, some not
    expected, norms = expected_clipped_sum(units, max_norm)
    scores, got_norms = bookkeeping.clipped_gradient_sum(critic, batch, wgan_terms(3), max_norm)
    torch.testing.assert_close(got_norms, norms, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(flat(p.grad for p in critic.parameters()), expected, rtol=1e-4, atol=1e-5)
    assert scores.shape == (7,) and not scores.requires_grad


@pytest.mark.parametrize("network", ["paper", "dcgan"])
def test_units_of_k_samples_are_clipped_as_the_mean_of_their_gradients(network):
    torch.manual_seed(1)
    critic, k = Discriminator(ndf=4) if network == "paper" else DCGANCritic(ndf=4), 3
    batch = torch.randn(8, 2, 96, 96)  # 2 patients of 3 real patches, then 2 fake samples
    units = (unit_gradients(copy.deepcopy(critic), batch[:6], -1, k)
             + unit_gradients(copy.deepcopy(critic), batch[6:], 1))
    max_norm = torch.stack([flat(u).norm() for u in units]).median().item()
    expected, norms = expected_clipped_sum(units, max_norm)
    _, got_norms = bookkeeping.clipped_gradient_sum(critic, batch, wgan_terms(6), max_norm, blocks=((6, k), (2, 1)))
    torch.testing.assert_close(got_norms, norms, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(flat(p.grad for p in critic.parameters()), expected, rtol=1e-4, atol=1e-5)


def test_blocks_that_do_not_cut_the_batch_into_whole_units_are_refused():
    with pytest.raises(ValueError, match="whole units"):
        bookkeeping.clipped_gradient_sum(Discriminator(ndf=4), torch.randn(5, 2, 96, 96), lambda s, rows: s, 1.0,
                                         blocks=((4, 3), (1, 1)))


@pytest.mark.parametrize("layer, message", [
    (nn.BatchNorm2d(2), "mixes the samples"),
    (nn.BatchNorm2d(2, affine=False), "mixes the samples"),
    (nn.ConvTranspose2d(2, 2, 3), "ConvTranspose2d"),
    (nn.Conv2d(2, 2, 3, groups=2), "groups 1"),
    (nn.InstanceNorm2d(2, track_running_stats=True), "running statistics"),
])
def test_layers_it_cannot_clip_per_sample_are_refused_by_name(layer, message):
    critic = nn.Sequential(nn.Conv2d(2, 2, 3), layer)
    with pytest.raises(ValueError, match=message) as err:
        bookkeeping.check_supported(critic)
    assert "'1'" in str(err.value)  # the layer's name in the critic
    bookkeeping.check_supported(Discriminator(ndf=4))
    bookkeeping.check_supported(DCGANCritic(ndf=4))


def test_a_parameter_shared_by_two_layers_is_refused():
    """Each layer's norm would be taken alone and the squares added: less than the norm of the summed gradient."""
    critic = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3))
    critic[2].weight = critic[0].weight
    with pytest.raises(ValueError, match="layers '0' and '2' share a parameter"):
        bookkeeping.check_supported(critic)


def test_a_parameter_no_layer_used_is_an_error_not_a_step_on_noise_alone():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.extra = nn.Linear(4, 1), nn.Linear(4, 1)

        def forward(self, x):
            return self.fc(x)[:, 0] + torch.nn.functional.linear(x, self.extra.weight)[:, 0]
    with pytest.raises(ValueError, match="2 parameters of the critic were not used"):
        bookkeeping.clipped_gradient_sum(Functional(), torch.randn(3, 4), lambda s, rows: s, 1.0)


def test_the_paper_critic_mixes_ghost_and_materialised_norms():
    """Large feature maps with few weights (the first layers) materialise per-sample gradients; small maps with
    many weights (the deep layers, 19 M weights in the paper's fifth) use ghost norms."""
    critic = Discriminator(ndf=96)
    with bookkeeping.recording(critic) as records:
        critic(torch.randn(1, 2, 96, 96))
    ghost = [bookkeeping.uses_ghost_norm(out[0, 0].numel(), layer.weight[0].numel(), layer.out_channels)
             for layer, _, out in records]
    assert ghost == [False, False, True, True, True, True]


def test_the_clipped_sum_is_plain_data_that_an_optimizer_can_zero():
    critic = DCGANCritic(ndf=4)
    bookkeeping.clipped_gradient_sum(critic, torch.randn(3, 2, 96, 96), lambda s, rows: s, 1.0)
    assert all(p.grad is not None and p.grad.grad_fn is None and not p.grad.requires_grad
               for p in critic.parameters())
    torch.optim.SGD(critic.parameters(), lr=0.1).zero_grad(set_to_none=False)  # the DP optimizer's way
    assert all((p.grad == 0).all() for p in critic.parameters())


def test_physical_batches_hold_whole_units_and_give_the_same_update():
    assert bookkeeping.physical_batches(((6, 3), (2, 1)), 4) == [(0, ((3, 3),)), (3, ((3, 3), (1, 1))), (7, ((1, 1),))]
    assert bookkeeping.physical_batches(((6, 3), (2, 1)), 5) == [(0, ((3, 3),)), (3, ((3, 3), (2, 1)))]
    assert bookkeeping.physical_batches(((6, 3), (2, 1)), None) == [(0, ((6, 3), (2, 1)))]
    with pytest.raises(ValueError, match="a unit of 3 samples does not fit a physical batch of 2"):
        bookkeeping.physical_batches(((6, 3), (2, 1)), 2)
    torch.manual_seed(2)
    critic, batch = Discriminator(ndf=4), torch.randn(8, 2, 96, 96)

    def row_weighted(scores, rows):  # a loss term that depends on the sample's row in the whole batch
        return scores * (torch.arange(rows.start, rows.stop) - 2.5)
    results = []
    for max_physical_batch in (None, 4):
        critic.zero_grad(set_to_none=True)
        scores, norms = bookkeeping.clipped_gradient_sum(critic, batch, row_weighted, 0.05, ((6, 3), (2, 1)),
                                                         max_physical_batch)
        results.append((scores, norms, flat(p.grad for p in critic.parameters())))
    for one_pass, chunked in zip(*results):
        torch.testing.assert_close(chunked, one_pass, rtol=1e-4, atol=1e-6)


def test_under_mixed_precision_norms_and_sums_are_float32_and_one_sample_moves_the_sum_at_most_c():
    """bfloat16 passes (run_gan.py --amp): the clipping still bounds each sample's contribution by C, because the
    norms and the sum are computed in float32 from the same per-sample quantities."""
    torch.manual_seed(3)
    critic, batch, max_norm = DCGANCritic(ndf=4), torch.randn(6, 2, 96, 96), 0.05

    def clipped_sum(samples, amp):
        critic.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            scores, norms = bookkeeping.clipped_gradient_sum(critic, samples, lambda s, rows: -s, max_norm)
        assert all(p.grad.dtype == torch.float32 for p in critic.parameters()) and norms.dtype == torch.float32
        return flat(p.grad for p in critic.parameters()), norms

    total, norms = clipped_sum(batch, amp=True)
    assert (norms > max_norm).sum() >= 3  # most samples are clipped: the bound is what is tested
    for i in range(len(batch)):
        without_one, _ = clipped_sum(torch.cat([batch[:i], batch[i + 1:]]), amp=True)
        assert (total - without_one).norm() <= max_norm * (1 + 1e-5)
    reference, _ = clipped_sum(batch, amp=False)
    assert torch.nn.functional.cosine_similarity(total, reference, dim=0) > 0.99  # bfloat16 rounding only


def test_what_opacus_refuses_is_refused_too():
    with pytest.raises(ValueError, match="Opacus refuses the critic: .*training mode"):
        bookkeeping.check_supported(Discriminator(ndf=4).eval())


@pytest.mark.parametrize("network", ["paper", "dcgan"])
def test_a_float64_critic_is_clipped_in_float64(network):
    """Every tensor bk makes takes the critic's dtype: a float64 critic's norms, scores and sums are float64, and
    match per-sample gradients to float64 precision."""
    torch.manual_seed(4)
    critic = (Discriminator(ndf=4) if network == "paper" else DCGANCritic(ndf=4)).double()
    batch = torch.randn(6, 2, 96, 96, dtype=torch.float64)
    units = unit_gradients(copy.deepcopy(critic), batch[:4], -1, k=2) + unit_gradients(copy.deepcopy(critic),
                                                                                       batch[4:], 1)
    max_norm = torch.stack([flat(u).norm() for u in units]).median().item()
    expected, norms = expected_clipped_sum(units, max_norm)
    scores, got_norms = bookkeeping.clipped_gradient_sum(critic, batch, wgan_terms(4), max_norm, ((4, 2), (2, 1)))
    assert scores.dtype == got_norms.dtype == torch.float64
    assert all(p.grad.dtype == torch.float64 for p in critic.parameters())
    torch.testing.assert_close(got_norms, norms, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flat(p.grad for p in critic.parameters()), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("network", ["paper", "dcgan"])
def test_every_tensor_is_made_on_the_critics_device(network, monkeypatch):
    """On the meta device (a stand-in for a GPU that a CPU can run: a tensor made on the host would meet a meta
    tensor in some operation and raise) the whole clipped sum, physical batches and units included, stays there."""
    autocast = torch.autocast  # which has no meta device; bk only switches it off
    monkeypatch.setattr(torch, "autocast", lambda device_type, *a, **k: contextlib.nullcontext()
                        if device_type == "meta" else autocast(device_type, *a, **k))
    critic = (Discriminator(ndf=4) if network == "paper" else DCGANCritic(ndf=4)).to("meta")
    batch = torch.randn(8, 2, 96, 96, device="meta")

    def terms(scores, rows):
        return torch.where(torch.arange(rows.start, rows.stop, device=scores.device) < 6, -scores, scores)
    scores, norms = bookkeeping.clipped_gradient_sum(critic, batch, terms, 1.0, ((6, 3), (2, 1)), max_physical_batch=5)
    assert scores.shape == (8,) and norms.shape == (4,)
    assert {scores.device.type, norms.device.type} | {p.grad.device.type for p in critic.parameters()} == {"meta"}
