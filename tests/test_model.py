"""Shapes, size checks and initialisation of the networks in model.py."""

import pytest
import torch
from torch import nn

from model import (
    INIT_STD,
    PATCH,
    Discriminator,
    Generator,
    UNet,
    conv_on_upsampled_and_skip,
    critic_sizes,
    generator_sizes,
)


def test_paper_generator_and_critic_shapes():
    g, d = Generator(ngf=96, kg=4, strg=2, padg=1, opg=0), Discriminator(ndf=96, kd=4, strd=2)
    with torch.no_grad():
        fake = g(torch.randn(1, 128))
        assert fake.shape == (1, 2, PATCH, PATCH)
        assert fake.abs().max() <= 1  # tanh
        assert d(fake).shape == (1,)
        assert d.main(fake).shape == (1, 1, 2, 2)  # SPEC: 1 x 2 x 2 outputs, the score is their mean
    assert generator_sizes(4, 2, 1, 0) == [3, 6, 12, 24, 48, 96]
    assert critic_sizes(4, 2)[-1] == 2


@pytest.mark.parametrize("kwargs", [dict(kg=4), dict(kg=5, padg=2, opg=1), dict(upsampling=True)])
def test_tiny_generator_variants(kwargs):
    g = Generator(ngf=4, **kwargs)
    with torch.no_grad():
        assert g(torch.randn(3, 128)).shape == (3, 2, PATCH, PATCH)


def test_group_norm_follows_every_hidden_layer():
    g = Generator(ngf=4)
    norms = [m for m in g.modules() if isinstance(m, nn.GroupNorm)]
    assert [m.num_channels for m in norms] == [64, 32, 16, 8, 4]
    assert all(m.num_groups == min(32, m.num_channels) for m in norms)


@pytest.mark.parametrize("kwargs", [dict(kg=3), dict(kg=4, strg=3), dict(kg=4, padg=0), dict(kg=6)])
def test_generator_sizes_that_miss_96_raise(kwargs):
    with pytest.raises(ValueError, match="kg="):
        Generator(ngf=4, **kwargs)


def test_critic_that_shrinks_to_nothing_raises():
    with pytest.raises(ValueError, match="kd=40"):
        Discriminator(ndf=4, kd=40, strd=2)


def test_conv_weights_are_normal_with_sd_0_05():
    torch.manual_seed(0)
    for net in (Generator(ngf=8), Generator(ngf=8, upsampling=True), Discriminator(ndf=8)):
        weights = torch.cat([m.weight.flatten() for m in net.modules()
                             if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))])
        assert abs(weights.mean().item()) < 0.005
        assert weights.std().item() == pytest.approx(INIT_STD, rel=0.05)
    assert not any(m.bias is not None for m in Discriminator(ndf=4).modules() if isinstance(m, nn.Conv2d))


def test_unet_shapes_with_paper_kernels():
    unet = UNet(kernels=(32, 64, 128, 256, 512), dropout=0.1).eval()
    with torch.no_grad():
        out = unet(torch.randn(2, 1, PATCH, PATCH))
    assert out.shape == (2, 1, PATCH, PATCH)
    assert 0 <= out.min() and out.max() <= 1


@pytest.mark.parametrize("shape", [(6, 6), (5, 9)])
def test_up_level_convolution_equals_upsample_concatenate_convolve(shape):
    """The U-Net's fast up-level path computes the same values and gradients as the textbook formulation,
    also at odd sizes and at the borders (where the zero padding must fall on the same pixels)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(7 + 3, 4, 3, padding=1)
    low = torch.randn(2, 7, *shape, requires_grad=True)
    skip = torch.randn(2, 3, 2 * shape[0], 2 * shape[1], requires_grad=True)
    plain = conv(torch.cat([nn.Upsample(scale_factor=2, mode="nearest")(low), skip], dim=1))
    fast = conv_on_upsampled_and_skip(conv, low, skip)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(plain)
    grads_plain = torch.autograd.grad(plain, [low, skip, conv.weight, conv.bias], upstream)
    grads_fast = torch.autograd.grad(fast, [low, skip, conv.weight, conv.bias], upstream)
    for g_fast, g_plain in zip(grads_fast, grads_plain):
        torch.testing.assert_close(g_fast, g_plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("upsampling", [False, True])
@pytest.mark.parametrize("ngf", [1, 2])
def test_only_the_output_layer_has_tanh_even_when_hidden_layers_have_two_channels(ngf, upsampling):
    body = [type(m).__name__ for m in Generator(ngf=ngf, upsampling=upsampling).body]
    assert body.count("Tanh") == 1 and body[-1] == "Tanh"
    assert body.count("GroupNorm") == 4  # layers 2-5; the stem holds layer 1's
