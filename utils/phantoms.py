"""Synthetic TOF-MRA phantoms: a random cerebral artery tree in an ellipsoidal brain, imaged like TOF-MRA.

The real scans of the paper cannot be shared, so every step of the pipeline runs on these phantoms. Each
patient gets its own artery tree, grown in millimetres so that the anisotropic voxels (0.5 x 0.5 x 0.7 mm)
are handled exactly: trunks of 3-4 mm diameter enter the slab from below, form a circle-of-Willis-like
junction, and branch outward (Murray's law) into tortuous vessels of well below 1 mm diameter that run in
every direction. The image is what a TOF sequence makes of it: bright inflowing blood (dimmer in slow,
small and distal vessels), partial volume at vessel borders, darker textured brain tissue with CSF, dark
skull, bright scalp fat, a smooth multiplicative bias field and Rician noise. The label is the voxels at
least half filled by a vessel, inside the brain mask; the thinnest vessels show in the image near the noise
level but are too thin to be labelled, so a segmentation cannot be perfect. The artery tree and its partial
volume are utils/vessel_tree.py's; the head around it, the imaging and the files are this module's.
"""

import gzip
import zlib
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

import config
from utils.common import PipelineError, atomic_write, save_figure
from utils.data import patient_paths
from utils.vessel_tree import LARGE_FRACTION, grow_vessel_tree, rasterise_vessels, voxel_axes_mm

Phantom = namedtuple("Phantom", "img label mask affine")
# Written into every NIfTI header (descrip) so that a re-run can tell its own files, and their seed, apart.
GENERATOR_TAG = "dpgan-phantom-v1"


@dataclass(frozen=True)
class Protocol:
    """Signal levels (arbitrary TOF units) and artefact strengths of one scanner/protocol."""

    grey: float  # grey-matter-like tissue
    white: float  # white-matter-like tissue (slightly brighter in TOF: shorter T1)
    csf: float
    skull: float
    fat: float  # scalp fat, bright in TOF
    blood: float  # fully unsaturated blood in a large artery
    noise: float  # SD of each Gaussian channel before taking the magnitude (Rician noise)
    bias: float  # SD of the log of the multiplicative bias field
    saturation_mm: float  # blood signal decays by 1/e over this travel distance inside the slab


INTERNAL = Protocol(grey=165, white=195, csf=55, skull=25, fat=330, blood=900, noise=16, bias=0.12, saturation_mm=260)
# test2 plays the external 1000Plus study: other scanner, flatter vessel contrast, more noise, stronger bias.
EXTERNAL = Protocol(grey=205, white=225, csf=90, skull=40, fat=370, blood=820, noise=24, bias=0.25, saturation_mm=200)

SULCUS_SPACING = 10.0  # mm between sulci along the brain's outline


def make_phantom(shape, spacing, seed, external=False):
    """One synthetic TOF-MRA patient: (img float32, label uint8, mask uint8, affine 4x4) as a Phantom tuple.

    shape: voxels (x, y, z), z axial; spacing: mm per voxel; seed: int or sequence of ints (deterministic);
    external: image with the EXTERNAL protocol (the test2 set) instead of INTERNAL.
    """
    shape = tuple(int(n) for n in shape)
    spacing = np.asarray(spacing, dtype=float)
    protocol = EXTERNAL if external else INTERNAL
    rng = np.random.default_rng(seed)
    extent = np.asarray(shape) * spacing
    head = Head(rng, extent)
    level = head.level(*voxel_axes_mm(shape, spacing))
    mask = level <= 1

    large_budget = rng.uniform(*LARGE_FRACTION) * mask.sum() * spacing.prod()
    branches = grow_vessel_tree(rng, head, extent, protocol, large_budget)
    occupancy, blood = rasterise_vessels(branches, shape, spacing)
    tissue = _brain_tissue(rng, shape, spacing, level, head, protocol)
    noiseless = tissue * (1 - occupancy) + protocol.blood * blood  # partial volume: tissue and blood mix
    noiseless *= np.exp(protocol.bias * smooth_noise(rng, shape, spacing, 40.0))
    noise = rng.standard_normal((2, *shape), dtype=np.float32) * np.float32(protocol.noise)
    img = np.hypot(noiseless + noise[0], noise[1]).astype(np.float32)  # magnitude of complex data: Rician
    label = (occupancy >= 0.5) & mask
    return Phantom(img, label.astype(np.uint8), mask.astype(np.uint8), phantom_affine(shape, spacing))


def phantom_affine(shape, spacing):
    """Voxel index -> mm, axes aligned, origin at the centre of the volume (as voxel_axes_mm)."""
    spacing = np.asarray(spacing, dtype=float)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2 * spacing
    return affine



class Head:
    """Brain geometry in mm: an ellipsoid with a gently lobed outline, filling most of the field of view.

    The slab is thin compared to the brain, so in z the ellipsoid is long (the slab cuts through it).
    """

    def __init__(self, rng, extent_mm):
        width, depth, height = extent_mm
        self.centre = np.array([rng.uniform(-0.02, 0.02) * width, rng.uniform(-0.02, 0.02) * depth, 0.1 * height])
        self.semi_axes = np.array([0.41 * width * rng.uniform(0.95, 1.02), 0.43 * depth * rng.uniform(0.95, 1.02),
                                   max(100.0, 1.2 * height)])
        self.lobe_amplitudes = rng.uniform(-0.03, 0.03, size=3)  # outline harmonics 2, 3, 4 around z
        self.lobe_phases = rng.uniform(0, 2 * np.pi, size=3)
        self.level_per_mm = 1 / self.semi_axes[:2].mean()  # level change per mm across the brain surface

    def azimuth(self, x, y):
        """Angle around the brain's centre in the axial plane, radians."""
        return np.arctan2(y - self.centre[1], x - self.centre[0])

    def normal(self, point):
        """Outward unit normal of the ellipsoid through point (the outline's lobes ignored)."""
        gradient = (np.asarray(point) - self.centre) / self.semi_axes**2
        return gradient / np.linalg.norm(gradient)

    def level(self, x, y, z):
        """Normalised radius: < 1 inside the brain, 1 on its surface, about 1 + t * level_per_mm t mm outside."""
        dx, dy, dz = x - self.centre[0], y - self.centre[1], z - self.centre[2]
        angle = self.azimuth(x, y)
        outline = 1 + sum(a * np.cos(k * angle + p)
                          for k, a, p in zip((2, 3, 4), self.lobe_amplitudes, self.lobe_phases))
        radius = np.sqrt((dx / self.semi_axes[0]) ** 2 + (dy / self.semi_axes[1]) ** 2 + (dz / self.semi_axes[2]) ** 2)
        return (radius / outline).astype(np.float32)



# ---------------------------------------------------------------- tissue, noise fields
def smooth_noise(rng, shape, spacing, scale_mm):
    """Gaussian random field of unit SD with correlation length ~scale_mm; made coarse, then interpolated."""
    spacing = np.asarray(spacing, dtype=float)
    factor = np.maximum(1, np.floor(scale_mm / spacing / 3)).astype(int)
    coarse_shape = -(-np.asarray(shape) // factor)
    coarse = rng.standard_normal(tuple(coarse_shape), dtype=np.float32)
    coarse = ndimage.gaussian_filter(coarse, sigma=scale_mm / (spacing * factor), mode="wrap")
    field = _resize_linear(coarse, shape)
    field -= field.mean()
    field /= max(float(field.std()), 1e-6)
    return field


def _resize_linear(array, shape):
    """Linear interpolation to shape, one axis at a time (voxel centres aligned, periodic like the noise)."""
    for axis, n_out in enumerate(shape):
        n_in = array.shape[axis]
        if n_in == n_out:
            continue
        position = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        below = np.floor(position).astype(int)
        weight = (position - below).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(array.ndim)])
        array = (np.take(array, below % n_in, axis=axis) * (1 - weight)
                 + np.take(array, (below + 1) % n_in, axis=axis) * weight)
    return array


def _brain_tissue(rng, shape, spacing, level, head, protocol):
    """Signal without vessels: textured brain (grey/white, sulcal and surface CSF), skull, scalp fat, air."""
    x, y, _ = voxel_axes_mm(shape, spacing)
    white = 1 / (1 + np.exp(-2.5 * smooth_noise(rng, shape, spacing, 4.0)))
    brain = protocol.grey + (protocol.white - protocol.grey) * white
    brain *= 1 + 0.05 * smooth_noise(rng, shape, spacing, 0.7)
    per_mm = head.level_per_mm
    # sulci: wavy sheets of CSF, about every SULCUS_SPACING mm around the brain, reaching ~15 mm deep
    n_sulci = round(2 * np.pi / per_mm / SULCUS_SPACING)
    wander = smooth_noise(rng, shape, spacing, 8.0)
    phase = n_sulci * head.azimuth(x, y) + 5.0 * wander
    depth = np.clip((level - (1 - 15 * per_mm)) / (10 * per_mm) + 0.3 * wander, 0, 1)
    sulci = 0.7 * np.clip((np.cos(phase) - 0.9) / 0.1, 0, 1) * depth
    surface = np.clip((level - (1 - 2 * per_mm)) / (2 * per_mm), 0, 1)
    csf = np.maximum(sulci, 0.8 * surface)
    brain += (protocol.csf - brain) * csf
    # outside the brain: 4 mm skull, 4 mm scalp with fat, then air (all with ~1 mm soft borders)
    outside = np.interp(level, 1 + per_mm * np.array([0, 1, 4, 5, 7, 8]),
                        [protocol.csf, protocol.skull, protocol.skull, protocol.fat, protocol.fat, 0.0])
    return np.where(level <= 1, brain, outside.astype(np.float32)).astype(np.float32)


# ---------------------------------------------------------------- files
def phantom_ids(split):
    """The ids of a split's phantoms, "<split>_<index>" (3 digits) for config.N_PATIENTS[split] patients: zero-padded,
    so that their sorted order, in which the pipeline finds them, is the order of their indices (and seeds)."""
    return [f"{split}_{index:03d}" for index in range(config.N_PATIENTS[split])]


def preview_path(data_dir, split):
    return Path(data_dir) / f"{split}_preview.png"


def patient_seed(seed, split, index):
    """Seed of one patient: the run's seed, the split (by name, stable) and the patient's index."""
    return [int(seed), zlib.crc32(split.encode()), int(index)]


def _description(seed, split, index):
    return f"{GENERATOR_TAG} seed={seed} {split}#{index}"


def write_phantoms(data_dir, splits, seed, overwrite=False):
    """Write a phantom per patient of each split (phantom_ids; files as utils.data.patient_paths) and a preview PNG
    per split.

    A patient whose three files exist already, made by this generator with this seed and the configured
    shape and spacing, is skipped. Any other existing file is an error unless overwrite, raised before anything
    is written. Returns the list of (split, patient) written.
    """
    data_dir = Path(data_dir)
    shape, spacing = tuple(config.VOLUME_SHAPE), tuple(config.VOXEL_SPACING)
    if seed < 0:
        raise PipelineError(f"--seed {seed}: must be >= 0")
    unknown = [s for s in splits if s not in config.SPLITS]
    if unknown:
        raise PipelineError(f"--splits: unknown split(s) {unknown}; known: {list(config.SPLITS)}")

    todo, problems = [], []
    for split in splits:
        for index, patient in enumerate(phantom_ids(split)):
            paths = patient_paths(split, patient, data_dir)
            existing = [p for p in paths.values() if p.exists()]
            if overwrite or not existing:
                todo.append((split, index, patient))
                continue
            problem = _existing_problem(paths, existing, _description(seed, split, index), shape, spacing)
            if problem:
                problems.append(f"{split}/{patient}: {problem}")
            else:
                print(f"{split}/{patient}: exists, skipping")
    if problems:
        raise PipelineError("existing phantom files would be replaced; pass --overwrite to replace them "
                            "(nothing was written):\n  " + "\n  ".join(problems))

    previewed = set()  # the preview shows the first patient (re)made in this run, else the split's first
    for split, index, patient in tqdm(todo, desc="phantoms", unit="patient", disable=not todo):
        external = split in config.EXTERNAL_SPLITS
        phantom = make_phantom(shape, spacing, patient_seed(seed, split, index), external=external)
        description = _description(seed, split, index)
        for kind, path in patient_paths(split, patient, data_dir).items():
            _save_nifti(path, getattr(phantom, kind), phantom.affine, description)
        if split not in previewed:
            tqdm.write(f"preview: {save_preview(phantom, preview_path(data_dir, split), f'{split}/{patient}')}")
            previewed.add(split)
    for split in splits:
        path = preview_path(data_dir, split)
        if split not in previewed and not path.exists():
            patient = phantom_ids(split)[0]
            save_preview(_load_phantom(patient_paths(split, patient, data_dir)), path, f"{split}/{patient}")
            print(f"preview: {path}")
    return [(split, patient) for split, _, patient in todo]


def _existing_problem(paths, existing, description, shape, spacing):
    """Why existing files of a patient cannot be reused (None when they are this run's phantom)."""
    if len(existing) < len(paths):
        missing = [p.name for p in paths.values() if not p.exists()]
        return f"incomplete, {', '.join(missing)} missing"
    for path in existing:
        try:
            header = nib.load(path).header
        except (OSError, EOFError, ValueError, nib.filebasedimages.ImageFileError) as err:
            return f"{path} cannot be read ({err})"
        found = header["descrip"].item().decode(errors="replace")
        if found != description:
            return f"{path} is not this run's phantom (its header says {found!r}, expected {description!r})"
        if header.get_data_shape() != shape or not np.allclose(header.get_zooms(), spacing):
            return (f"{path} has shape {header.get_data_shape()} and spacing {header.get_zooms()}, "
                    f"not {shape} and {spacing}")
    return None


def _save_nifti(path, array, affine, description):
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = description
    # compressed here (fixed mtime: same seed, same bytes), then written atomically
    data = gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def _load_phantom(paths):
    images = {kind: nib.load(path) for kind, path in paths.items()}
    arrays = {kind: np.asarray(image.dataobj) for kind, image in images.items()}
    return Phantom(arrays["img"], arrays["label"], arrays["mask"], images["img"].affine)


def save_preview(volumes, path, title=""):
    """PNG of one patient: axial maximum-intensity projection, middle slice, and that slice with the label.

    volumes: (img, label, mask, ...) as returned by make_phantom; arrays x, y, z with z axial.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img, label, mask = (np.asarray(v) for v in volumes[:3])
    middle = img.shape[2] // 2
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.6))
    panels = [(img.max(axis=2), "axial MIP"), (img[:, :, middle], f"slice z={middle}"),
              (img[:, :, middle], f"slice z={middle} + label")]
    for ax, (picture, name) in zip(axes, panels):
        top = float(np.percentile(picture, 99.7))  # a few of the brightest vessels saturate, as on a scanner
        ax.imshow(picture.T, cmap="gray", origin="lower", vmin=0, vmax=top, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    overlay = np.ma.masked_where(label[:, :, middle].T == 0, label[:, :, middle].T)
    axes[2].imshow(overlay, cmap="autumn", origin="lower", alpha=0.6, interpolation="nearest")
    fraction = label.sum() / max(int(mask.sum()), 1)
    fig.suptitle(f"{title}   shape {img.shape}   vessel voxels: {fraction:.2%} of the brain mask")
    save_figure(path, fig)
    return path
