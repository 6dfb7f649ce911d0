"""Per-sample clipping at about the cost of a plain backward pass: the `bk` engine of run_gan.py.

Book-keeping (Bu et al., ICML 2023) with mixed ghost norms (Bu et al., NeurIPS 2022). A layer's per-sample weight
gradient is G_i^T A_i: A_i its input (T positions x fan-in D_in, a convolution's input unfolded) and G_i the
gradient of sample i's loss at its output (T x D_out). One backward pass asks autograd for the output gradients G
only (no weight gradient is formed); from the kept A and G each layer gives
- its per-sample gradient norms, either through the materialised G_i^T A_i (cheap where T is large and the layer
  small: the critic's first layers), or as the ghost norm sum_ts (a_t . a_s)(g_t . g_s), which never forms the
  per-sample gradient (where 2 T^2 < D_in D_out: the wide, deep layers, where per-sample gradients would be
  batch x 19 M floats for the paper's critic);
- after all layers' norms give each sample's clip factor c_i = min(1, C / (||g_i|| + 1e-6)) (Opacus's formula),
  the clipped sum sum_i c_i G_i^T A_i: one matrix product with the output gradients scaled by c_i.
No gradient is computed twice and no forward pass is repeated. The noise, the division by the expected batch and
the accountant's step stay Opacus's (DPOptimizerFastGradientClipping adds noise to p.grad = the clipped sum),
so the privacy mechanism is the same as with Opacus's own engines: tests/test_gan.py checks the update against
the hooks engine with noise zero and with one fixed noise draw.

Units of several samples (patient-level DP: k patches of one patient) are clipped as one: their loss terms are
averaged, and their norm is that of the summed gradient (ghost norms over the unit's k T positions).
Supported layers: Conv2d (groups 1, zero padding), Linear, GroupNorm; anything else with parameters, and
BatchNorm (which mixes samples), is refused by check_supported.
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.validators import ModuleValidator
from torch import nn

SUPPORTED_LAYERS = (nn.Conv2d, nn.Linear, nn.GroupNorm)


class BookkeepingDPOptimizer(DPOptimizerFastGradientClipping):
    """Opacus's optimizer for ready-clipped sums (noise, division by the expected batch, accountant hook), holding
    the last step's per-unit gradient norms for the diagnostics."""

    per_unit_norms = None


def check_supported(critic):
    """Raise ValueError naming the first layer the bk engine cannot clip per sample, or what Opacus's own module
    validator refuses (e.g. running statistics learnt from the data without noise). The critic must also treat
    every sample on its own (no parameter-free mixing across the batch); like Opacus, this cannot be checked."""
    owners = {}
    for name, module in critic.named_modules():
        for p in module.parameters(recurse=False):
            if id(p) in owners:  # per-layer norms would be added, not those of the summed gradient
                raise ValueError(f"layers {owners[id(p)]!r} and {name!r} share a parameter; the bk engine clips "
                                 f"layers with parameters of their own")
            owners[id(p)] = name
        if isinstance(module, nn.InstanceNorm2d) and module.track_running_stats:
            raise ValueError(f"layer {name!r} ({type(module).__name__}) keeps running statistics of the data, "
                             f"which would be released without noise")
    for name, module in critic.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ValueError(f"layer {name!r} ({type(module).__name__}) mixes the samples of a batch; "
                             f"per-sample gradients need a per-sample normalisation (GroupNorm, InstanceNorm)")
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        if not isinstance(module, SUPPORTED_LAYERS):
            raise ValueError(f"layer {name!r} ({type(module).__name__}): the bk engine clips "
                             f"{', '.join(t.__name__ for t in SUPPORTED_LAYERS)} only; use another "
                             f"--grad_sample_mode")
        if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
            raise ValueError(f"layer {name!r}: the bk engine needs groups 1 and zero padding")
    errors = ModuleValidator.validate(critic, strict=False)
    if errors:
        raise ValueError(f"Opacus refuses the critic: {errors[0]}")


@contextmanager
def recording(critic):
    """Record (layer, input, output) of every parameterised layer during the forward passes inside the block."""
    records, handles = [], []
    for module in critic.modules():
        if isinstance(module, SUPPORTED_LAYERS) and any(p.requires_grad for p in module.parameters(recurse=False)):
            handles.append(module.register_forward_hook(
                lambda m, inputs, output: records.append((m, inputs[0].detach(), output))))
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def _positions(layer, x):
    """A layer's input as (n, T, D_in) rows, one per output position, in the weight's fan-in order."""
    if isinstance(layer, nn.Conv2d):
        cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        return cols.transpose(1, 2)
    return x.reshape(len(x), -1, x.shape[-1])


def _out_positions(layer, g):
    """An output gradient as (n, T, D_out)."""
    if isinstance(layer, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    return g.reshape(len(g), -1, g.shape[-1])


def _conv_weight_grad(layer, x, g, groups=1):
    """The weight gradient of a convolution from its input x and output gradient g, by the backward kernel a
    plain backward pass uses (groups n: x and g hold n samples side by side as channels, one weight per sample)."""
    weight = layer.weight if groups == 1 else layer.weight.repeat(groups, 1, 1, 1)
    return torch.ops.aten.convolution_backward(
        g, x, weight, None, layer.stride, layer.padding, layer.dilation, False, [0, 0], groups,
        [False, True, False])[1]


def _per_sample_weight_grads(layer, x, g):
    """(n, D_out, D_in) per-sample weight gradients; a convolution's as one grouped convolution's weight gradient
    (faster on a CPU than unfolding its input)."""
    n = len(x)
    if isinstance(layer, nn.Conv2d):
        grads = _conv_weight_grad(layer, x.reshape(1, -1, *x.shape[2:]), g.reshape(1, -1, *g.shape[2:]), n)
        return grads.reshape(n, layer.out_channels, -1)
    return torch.bmm(_out_positions(layer, g).transpose(1, 2), _positions(layer, x))


def _weight_grad_sum(layer, x, g, factor):
    """sum_i factor_i (weight gradient of sample i): the plain weight gradient of the factor-scaled g."""
    g = g * factor.view(-1, *[1] * (g.dim() - 1))
    if isinstance(layer, nn.Conv2d):
        return _conv_weight_grad(layer, x, g)
    return g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])


def _unit_sums(per_sample, blocks):
    """(n, ...) per-sample values -> (units, ...) sums over each unit's consecutive samples."""
    if all(k == 1 for _, k in blocks):
        return per_sample
    parts, start = [], 0
    for n, k in blocks:
        parts.append(per_sample[start:start + n].reshape(n // k, k, *per_sample.shape[1:]).sum(1))
        start += n
    return torch.cat(parts)


def _ghost_sq_norms(a, go, blocks):
    """Squared norms of the units' weight gradients sum_i G_i^T A_i, from Gram matrices over their k T positions."""
    parts, start = [], 0
    for n, k in blocks:
        au, gu = a[start:start + n], go[start:start + n]
        if k > 1:  # (a copy: the positions of k samples side by side)
            au, gu = au.reshape(n // k, -1, a.shape[2]), gu.reshape(n // k, -1, go.shape[2])
        parts.append((torch.bmm(au, au.transpose(1, 2)) * torch.bmm(gu, gu.transpose(1, 2))).sum((1, 2)))
        start += n
    return torch.cat(parts)


def uses_ghost_norm(positions, d_in, d_out):
    """Ghost norms where a unit's Gram matrices (positions^2, twice) are smaller than its per-sample gradient
    (d_in x d_out): Bu et al.'s mixed rule, which keeps memory at about a plain pass's."""
    return 2 * positions * positions < d_in * d_out


def _layer_clipping(layer, x, g, blocks):
    """One layer's squared per-unit gradient norms (summed over its parameters), and a function that gives
    sum_i factor_i grad_i (the clipped sum, given each sample's clip factor) as (parameter, sum) pairs."""
    if isinstance(layer, nn.GroupNorm):
        xhat = F.group_norm(x, layer.num_groups, eps=layer.eps)
        per_sample = [(xhat * g).flatten(2).sum(2), g.flatten(2).sum(2)]  # weight, bias: (n, C) each
        sq = sum(_unit_sums(s, blocks).square().sum(1) for s in per_sample)

        def clipped_sums(factor):
            return [(p, (factor @ s).view_as(p)) for p, s in zip((layer.weight, layer.bias), per_sample)]
        return sq, clipped_sums

    go = _out_positions(layer, g)
    t, d_in, d_out = go.shape[1], layer.weight[0].numel(), go.shape[2]
    bias = go.sum(1) if layer.bias is not None else None  # per-sample bias gradients (n, D_out)
    sq = _unit_sums(bias, blocks).square().sum(1) if bias is not None else 0
    if uses_ghost_norm(max(k for _, k in blocks) * t, d_in, d_out):
        sq = sq + _ghost_sq_norms(_positions(layer, x), go, blocks)

        def weight_sum(factor):
            return _weight_grad_sum(layer, x, g, factor)
    else:
        per_sample = _per_sample_weight_grads(layer, x, g)
        sq = sq + _unit_sums(per_sample, blocks).flatten(1).square().sum(1)

        def weight_sum(factor):
            return torch.einsum("n,noi->oi", factor, per_sample)

    def clipped_sums(factor):
        sums = [(layer.weight, weight_sum(factor).view_as(layer.weight))]
        return sums + [(layer.bias, factor @ bias)] if bias is not None else sums
    return sq, clipped_sums


def physical_batches(blocks, max_samples):
    """Cut blocks ((n, k), ...) into consecutive physical batches of whole units, each of at most max_samples
    samples (None: one batch): [(first sample, blocks of that batch), ...]."""
    units = [k for n, k in blocks for _ in range(n // k)]
    if max_samples is not None and any(k > max_samples for k in units):
        raise ValueError(f"a unit of {max(units)} samples does not fit a physical batch of {max_samples}")
    batches, start, current = [], 0, []
    for k in units + [None]:
        if current and (k is None or (max_samples is not None and sum(current) + k > max_samples)):
            runs = []
            for size in current:  # run-length encode the batch's unit sizes
                if runs and runs[-1][1] == size:
                    runs[-1][0] += size
                else:
                    runs.append([size, size])
            batches.append((start, tuple(map(tuple, runs))))
            start, current = start + sum(current), []
        if k is not None:
            current.append(k)
    return batches


def _clip_physical_batch(critic, batch, per_sample_loss, max_norm, blocks):
    """clipped_gradient_sum of one physical batch: (scores, norms, [(parameter, clipped sum), ...])."""
    with recording(critic) as records:
        scores = critic(batch)
    if len({id(layer) for layer, _, _ in records}) != len(records):
        raise ValueError("a layer of the critic runs twice in one forward pass; the bk engine clips layers run once")
    # Every tensor made here is made on the critic's device, in its parameters' dtype (on a GPU nothing is made on
    # the host and copied over).
    reference = records[0][0].weight
    weights = torch.cat([torch.full((n,), 1.0 / k, dtype=reference.dtype, device=reference.device)
                         for n, k in blocks])
    losses = per_sample_loss(scores) * weights  # a unit's loss: the mean of its samples' terms
    grads = torch.autograd.grad(losses.sum(), [out for _, _, out in records])  # no weight gradient is formed
    # p.grad is data: no autograd graph through the weights. Under mixed precision (run_gan.py --amp) the passes
    # above ran in bfloat16; the norms, clip factors and sums run in the parameters' float32 from the same A and G,
    # so that each sample's contribution to the sum is exactly the gradient whose norm was clipped.
    with torch.no_grad(), torch.autocast(reference.device.type, enabled=False):
        layers = [_layer_clipping(layer, x.to(reference.dtype), g.to(reference.dtype), blocks)
                  for (layer, x, _), g in zip(records, grads)]
        norms = sum(sq for sq, _ in layers).clamp_min(0).sqrt()  # ghost sums can round below 0
        factors = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # Opacus's clip factor
        per_sample = torch.cat([f.repeat_interleave(k) for f, (_, k) in
                                zip(factors.split([n // k for n, k in blocks]), blocks)])
        sums = [pair for _, clipped_sums in layers for pair in clipped_sums(per_sample)]
    return scores.detach().to(reference.dtype), norms, sums


def clipped_gradient_sum(critic, batch, per_sample_loss, max_norm, blocks=None, max_physical_batch=None):
    """Forward `batch` through `critic`, clip each unit's gradient of its loss term to max_norm and write the sum
    of the clipped gradients into p.grad. Returns (detached scores, per-unit gradient norms before clipping).

    per_sample_loss(scores, rows): one loss term per sample, for the scores of batch[rows]. blocks: ((n_1, k_1),
    (n_2, k_2), ...), consecutive runs of the batch, each of n_j samples grouped in units of k_j consecutive ones
    whose loss terms are averaged (patient-level DP: ((real patches, k), (fake samples, 1))); None: every sample
    is a unit. max_physical_batch: at most this many samples (of whole units) per forward and backward pass, so
    that a large logical batch fits the device's memory; the sum is the same, since each unit is clipped alone.
    """
    blocks = tuple((n, k) for n, k in (blocks or ((len(batch), 1),)) if n)
    if sum(n for n, _ in blocks) != len(batch) or any(n % k for n, k in blocks):
        raise ValueError(f"blocks {blocks} do not cut a batch of {len(batch)} into whole units")
    scores, norms, totals = [], [], {}
    for start, part in physical_batches(blocks, max_physical_batch):
        rows = slice(start, start + sum(n for n, _ in part))
        part_scores, part_norms, sums = _clip_physical_batch(
            critic, batch[rows], lambda s, rows=rows: per_sample_loss(s, rows), max_norm, part)
        scores.append(part_scores)
        norms.append(part_norms)
        for p, total in sums:
            totals[id(p)] = (p, totals[id(p)][1] + total) if id(p) in totals else (p, total)
    missing = [p for p in critic.parameters() if p.requires_grad and id(p) not in totals]
    if missing:  # e.g. a layer's weight used through a functional call: it would train on noise alone
        raise ValueError(f"{len(missing)} parameters of the critic were not used by its layers' forward passes")
    for p, total in totals.values():
        p.grad = total
    return torch.cat(scores), torch.cat(norms)
