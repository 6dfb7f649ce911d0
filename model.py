"""The networks: DP-WGAN generator and critic (Kossen et al. 2022) and the half U-Net (Livne et al. 2019).

Self-contained: depends on torch only.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

PATCH = 96  # the paper's patch: its generator's output and critic's input are 2 x 96 x 96
INIT_STD = 0.05


def _group_norm(channels):
    # The authors trained with BatchNorm, which Opacus replaced by GroupNorm(min(32, C), C).
    return nn.GroupNorm(min(32, channels), channels)


def transposed_output_size(size, kernel, stride, padding, output_padding):
    return (size - 1) * stride - 2 * padding + kernel + output_padding


def generator_sizes(kg, strg, padg, opg):
    """Spatial sizes after each of the six transposed convolutions, starting from 1 x 1."""
    sizes = [transposed_output_size(1, kg, 2, 1, 5 - kg)]
    for _ in range(5):
        sizes.append(transposed_output_size(sizes[-1], kg, strg, padg, opg))
    return sizes


def critic_sizes(kd, strd, size=PATCH):
    sizes = []
    for _ in range(5):
        size = (size + 2 * strd - kd) // strd + 1
        sizes.append(size)
    sizes.append((size + 2 - kd) // strd + 1)
    return sizes


class Generator(nn.Module):
    """z (latent_dim x 1 x 1) -> tanh image-label pair (2 x 96 x 96)."""

    def __init__(self, ngf=96, kg=4, strg=2, padg=1, opg=0, latent_dim=128, upsampling=False):
        super().__init__()
        self.latent_dim = latent_dim
        channels = [16 * ngf, 8 * ngf, 4 * ngf, 2 * ngf, ngf]
        if upsampling:
            self.stem = nn.Sequential(
                nn.Flatten(), nn.Linear(latent_dim, channels[0] * 9, bias=False),
                nn.Unflatten(1, (channels[0], 3, 3)), _group_norm(channels[0]), nn.ReLU(True))
            layers = []
            for c_in, c_out in zip(channels, channels[1:] + [2]):
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 5, 1, 2, bias=False)]
                layers += [_group_norm(c_out), nn.ReLU(True)]
            self.body = nn.Sequential(*layers[:-2], nn.Tanh())  # the output layer: tanh, no normalisation
        else:
            if not 2 <= kg <= 5:
                raise ValueError(f"kg={kg}: the first layer must map 1 x 1 to 3 x 3, which needs 2 <= kg <= 5")
            sizes = generator_sizes(kg, strg, padg, opg)
            if sizes != [3, 6, 12, 24, 48, PATCH]:
                raise ValueError(
                    f"kg={kg} strg={strg} padg={padg} opg={opg} give sizes {sizes}, not 3, 6, ..., {PATCH}")
            self.stem = nn.Sequential(
                nn.ConvTranspose2d(latent_dim, channels[0], kg, 2, 1, 5 - kg, bias=False),
                _group_norm(channels[0]), nn.ReLU(True))
            layers = []
            for c_in, c_out in zip(channels, channels[1:] + [2]):
                layers += [nn.ConvTranspose2d(c_in, c_out, kg, strg, padg, opg, bias=False),
                           _group_norm(c_out), nn.ReLU(True)]
            self.body = nn.Sequential(*layers[:-2], nn.Tanh())  # the output layer: tanh, no normalisation
        init_weights(self)

    def forward(self, z):
        return self.body(self.stem(z.view(z.shape[0], self.latent_dim, 1, 1)))


class Discriminator(nn.Module):
    """WGAN critic: 2 x 96 x 96 -> one score per sample (the mean of its 1 x 2 x 2 outputs)."""

    def __init__(self, ndf=96, kd=4, strd=2):
        super().__init__()
        sizes = critic_sizes(kd, strd)
        if min(sizes) < 1:
            raise ValueError(f"kd={kd} strd={strd}: the critic's feature maps shrink to nothing ({sizes})")
        channels = [2, ndf, 2 * ndf, 4 * ndf, 8 * ndf, 16 * ndf]
        layers = []
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, kd, strd, strd, bias=False),
                       nn.InstanceNorm2d(c_out, affine=False), nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Conv2d(channels[-1], 1, kd, strd, 1, bias=False))
        self.main = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, x):
        return self.main(x).mean(dim=(1, 2, 3))


def dcgan_stem_size(size):
    """The dcgan pair's smallest feature map: size / 16 (four stride-2 layers); any multiple of 16 works."""
    if size < 16 or size % 16:
        raise ValueError(f"patch size {size}: the dcgan networks need a multiple of 16 (four stride-2 layers)")
    return size // 16


class DCGANGenerator(nn.Module):
    """A small DCGAN generator that learns on a CPU in minutes (the `dcgan` recipe): z -> linear -> C0 x s x s ->
    four [4x4 stride-2 transposed convolution, BatchNorm, ReLU] up to 16 s = size -> 3x3 convolution to 2 channels
    (s = 6 for the paper's 96 x 96). The image channel ends in tanh; the label channel is linear, clamped to
    [-1.5, 1.5], so that its output is never saturated and the label keeps a gradient wherever the critic asks for
    a vessel."""

    def __init__(self, channels=(96, 48, 24, 12, 8), latent_dim=64, size=PATCH):
        super().__init__()
        self.latent_dim = latent_dim
        if len(channels) != 5:
            raise ValueError(f"channels {channels}: four upsamplings need 5 widths")
        s = dcgan_stem_size(size)
        self.stem = nn.Sequential(nn.Linear(latent_dim, channels[0] * s * s), nn.Unflatten(1, (channels[0], s, s)),
                                  nn.BatchNorm2d(channels[0]), nn.ReLU(True))
        layers = []
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1), nn.BatchNorm2d(c_out), nn.ReLU(True)]
        self.body = nn.Sequential(*layers, nn.Conv2d(channels[-1], 2, 3, 1, 1))

    def forward(self, z):
        out = self.body(self.stem(z.view(z.shape[0], self.latent_dim)))
        return torch.cat([torch.tanh(out[:, :1]), out[:, 1:].clamp(-1.5, 1.5)], dim=1)


class DCGANCritic(nn.Module):
    """The `dcgan` recipe's critic, small for DP-SGD (ndf 16: 178 k parameters): four [4x4 stride-2 convolution,
    GroupNorm (not on the first), LeakyReLU 0.2] from size to size / 16, then a linear score. GroupNorm is per
    sample, so per-sample gradients stay per sample; Opacus refuses BatchNorm and spectral normalisation."""

    def __init__(self, ndf=16, size=PATCH):
        super().__init__()
        widths = [2, ndf, 2 * ndf, 4 * ndf, 8 * ndf]
        layers = []
        for i, (c_in, c_out) in enumerate(zip(widths, widths[1:])):
            layers.append(nn.Conv2d(c_in, c_out, 4, 2, 1))
            if i:
                layers.append(nn.GroupNorm(min(8, c_out), c_out))
            layers.append(nn.LeakyReLU(0.2))
        self.main = nn.Sequential(*layers, nn.Flatten(), nn.Linear(widths[-1] * dcgan_stem_size(size) ** 2, 1))

    def forward(self, x):
        return self.main(x)[:, 0]


def init_weights(module):
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, INIT_STD)


def glorot_init(module):
    """Keras's default initialisation, which the authors' U-Net had: Glorot-uniform weights, zero biases.

    PyTorch's default (kaiming-uniform with a = sqrt 5: a third of the weight variance, random biases) starts the
    U-Net nearly blind: its output is a near-constant sigmoid of the random biases (on demo patches the logit's SD
    over pixels is 0.002-0.005, against 0.014-0.046 with this initialisation)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


# Row k of the 4-tap kernel of a 2x nearest upsampling followed by a 3-tap (padding 1) convolution, as the sum
# of the 3-tap rows t it gathers: an output pixel of the upsampled image sees only two distinct input pixels.
_UPSAMPLED_TAPS = ((0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0))


def conv_on_upsampled_and_skip(conv, low, skip):
    """conv(cat([nearest 2x upsampling of low, skip])) for a 3x3 convolution with padding 1, computed without
    the upsampled tensor or the concatenation: the same function (to float rounding), 2.25x fewer multiply-adds
    on the upsampled channels. Their kernel part becomes a 4x4 transposed convolution of stride 2 on `low`
    (each output pixel of the upsampled image sees 2 x 2 distinct input pixels); the rest convolves `skip`."""
    c = low.shape[1]
    taps = torch.tensor(_UPSAMPLED_TAPS, dtype=conv.weight.dtype, device=conv.weight.device)
    w_low = torch.einsum("kt,lu,oitu->iokl", taps, taps, conv.weight[:, :c])
    return (F.conv_transpose2d(low, w_low, stride=2, padding=1)
            + F.conv2d(skip, conv.weight[:, c:], conv.bias, padding=1))


class UNet(nn.Module):
    """Half U-Net: two 3x3 ReLU convolutions per level with dropout between, 2x2 max-pool down,
    nearest 2x upsampling and concatenation up, 1x1 convolution and sigmoid: probabilities.
    Each up level's first convolution runs as conv_on_upsampled_and_skip (same function, faster)."""

    def __init__(self, kernels=(32, 64, 128, 256, 512), dropout=0.0, in_channels=1):
        super().__init__()
        self.down = nn.ModuleList()
        c_in = in_channels
        for k in kernels:
            self.down.append(self._level(c_in, k, dropout))
            c_in = k
        self.up = nn.ModuleList(self._level(kernels[i + 1] + kernels[i], kernels[i], dropout)
                                for i in reversed(range(len(kernels) - 1)))
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Conv2d(kernels[0], 1, 1)
        glorot_init(self)

    def start_at_prior(self, vessel_fraction):
        """Set the output bias to logit(vessel_fraction) (clamped to [1e-4, 0.5]): before training, every pixel's
        probability is about the training labels' vessel fraction instead of 0.5 (prior initialisation, Lin et al.
        2017)."""
        p = min(max(float(vessel_fraction), 1e-4), 0.5)
        nn.init.constant_(self.head.bias, math.log(p / (1 - p)))

    @staticmethod
    def _level(c_in, c_out, dropout):
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(True), nn.Dropout(dropout),
                             nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU(True))

    def forward(self, x):
        skips = []
        for i, level in enumerate(self.down):
            x = level(x)
            if i < len(self.down) - 1:
                skips.append(x)
                x = self.pool(x)
        for level, skip in zip(self.up, reversed(skips)):
            x = level[1:](conv_on_upsampled_and_skip(level[0], x, skip))
        return torch.sigmoid(self.head(x))
