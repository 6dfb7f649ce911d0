"""The GAN's training data: the patches file read and scaled to the critic's input, and the Poisson batches of
patches or patients drawn from it (the sampling the accountant counts).

Batches are Poisson samples (Opacus's sampler): every unit joins each batch independently with probability
q = batch / N, so a batch may be empty and its size varies; this is the subsampling the RDP and PRV accountants
assume (docs/method.md, "The DP-WGAN").
"""

import secrets

import numpy as np
import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

import config
from utils.common import PipelineError, load_npz, minmax_scale, patches_path
from utils.data import stripped_of

LOAD_CHUNK = 4096  # patches scaled at a time when loading


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


def patient_units(patients, args):
    """Patch indices per patient for --privacy_unit patient (patient_patches), with its flags checked against the
    training patches file."""
    path = patches_path("train")
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
