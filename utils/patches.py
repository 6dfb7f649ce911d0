"""Patch extraction (step 1): axial 2-D patches centred on vessel voxels and on brain-mask voxels.

A centre (x, y, z) gives the patch volume[x-h:x-h+size, y-h:y-h+size, z] with h = size // 2 (for the
paper's size 96: volume[x-48:x+48, y-48:y+48, z]). Centres are drawn only where that patch lies inside
the volume, and each centre is used at most once per patient.
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from tqdm import tqdm

import config
from utils.common import PipelineError, patches_path, refuse_existing, save_figure, save_npz
from utils.data import check_preparation, load_patient, stripped_of, validate_split

MONTAGE_PAIRS = 32


def montage_path(split):
    """The PNG of random patch pairs drawn next to the patches file."""
    return patches_path(split).parent / f"{split}_montage.png"


def patient_rng(seed, patient_index):
    """The random generator of one patient: depends on (seed, index in the split) only, not on loop order."""
    return np.random.default_rng([seed, patient_index])


def draw_centres(label, mask, n_patches, n_vessel, rng, patient):
    """Draw n_patches distinct centres (x, y, z), int32 (n_patches, 3).

    The first n_vessel are on randomly chosen vessel voxels (label 1), the rest on randomly chosen
    brain-mask voxels that are not already a vessel-centred centre; all where the whole patch fits.
    """
    size = config.PATCH_SIZE
    half = size // 2
    check_fits(label.shape, patient)
    # Only centres in [half, dim - size + half] along x and y keep the patch inside the volume.
    window = (slice(half, label.shape[0] - size + half + 1), slice(half, label.shape[1] - size + half + 1))
    vessel_pool = np.flatnonzero(label[window])
    if vessel_pool.size < n_vessel:
        raise PipelineError(f"patient {patient}: only {vessel_pool.size} vessel voxels where a {size}x{size} patch "
                            f"fits, but {n_vessel} vessel-centred patches were asked for")
    vessel = rng.choice(vessel_pool, size=n_vessel, replace=False)

    brain_region = mask[window] != 0  # a fresh array, so removing the vessel centres leaves mask untouched
    brain_region.flat[vessel] = False
    brain_pool = np.flatnonzero(brain_region)
    n_brain = n_patches - n_vessel
    if brain_pool.size < n_brain:
        raise PipelineError(f"patient {patient}: only {brain_pool.size} brain-mask voxels where a {size}x{size} "
                            f"patch fits (not counting the {n_vessel} vessel-centred centres), but {n_brain} "
                            f"brain-centred patches were asked for")
    brain = rng.choice(brain_pool, size=n_brain, replace=False)

    x, y, z = np.unravel_index(np.concatenate([vessel, brain]), brain_region.shape)
    return np.stack([x + half, y + half, z], axis=1).astype(np.int32)


def check_fits(shape, patient):
    size = config.PATCH_SIZE
    if shape[0] < size or shape[1] < size:
        raise PipelineError(f"patient {patient}: volume of shape {tuple(shape)} is smaller than a {size}x{size} "
                            f"patch in x or y")


def gather_patches(volume, centres):
    """The axial patches of volume at centres (N, 3) -> (N, size, size), same dtype as volume."""
    size = config.PATCH_SIZE
    half = size // 2
    # windows[i, j, z] is volume[i:i+size, j:j+size, z]: a view, so only the chosen patches are copied.
    windows = sliding_window_view(volume, (size, size), axis=(0, 1))
    return windows[centres[:, 0] - half, centres[:, 1] - half, centres[:, 2]]


def check_counts(n_patches, n_vessel):
    if n_patches < 1:
        raise PipelineError(f"--n_per_patient {n_patches}: must be at least 1")
    if not 0 <= n_vessel <= n_patches:
        raise PipelineError(f"--n_vessel {n_vessel}: must be between 0 and --n_per_patient ({n_patches})")


def extract_split(split, seed, n_patches=None, n_vessel=None, data_dir=None):
    """Patches of every patient of a split; returns dict img, label, patient, centre, skull_stripped (the patches
    file; skull_stripped: config.SKULL_STRIP, how every volume was prepared).

    Every patient's headers are checked before any voxel is read; the voxels (binary label and mask,
    enough candidate centres) as each patient is loaded. Nothing is written here, so a failure for
    any patient leaves no output behind.
    """
    n_patches = config.PATCHES_PER_PATIENT if n_patches is None else n_patches
    n_vessel = config.VESSEL_PATCHES_PER_PATIENT if n_vessel is None else n_vessel
    check_counts(n_patches, n_vessel)
    headers = validate_split(split, data_dir)
    for header in headers:
        check_fits(header.shape, header.patient)

    size = config.PATCH_SIZE
    total = n_patches * len(headers)
    out = {"img": np.empty((total, size, size), np.float32), "label": np.empty((total, size, size), np.uint8),
           "patient": np.repeat(np.array([h.patient for h in headers]), n_patches),
           "centre": np.empty((total, 3), np.int32), "skull_stripped": np.array(bool(config.SKULL_STRIP))}
    # The context closes the bar on an error too, so the error message starts on a line of its own.
    with tqdm(headers, desc=f"patches {split}", unit="patient") as progress:
        for index, header in enumerate(progress):
            volume = load_patient(split, header.patient, data_dir)
            centres = draw_centres(volume.label, volume.mask, n_patches, n_vessel, patient_rng(seed, index),
                                   header.patient)
            rows = slice(index * n_patches, (index + 1) * n_patches)
            out["centre"][rows] = centres
            out["img"][rows] = gather_patches(volume.img, centres)
            out["label"][rows] = gather_patches(volume.label, centres)
    return out


def write_patches(split, seed, n_patches=None, n_vessel=None, overwrite=False):
    """Extract a split's patches and write the patches file and its montage (refused if they exist, unless
    overwrite); returns the patches."""
    out_path, montage_file = patches_path(split), montage_path(split)
    if not overwrite:
        refuse_existing(out_path)
        refuse_existing(montage_file)
    patches = extract_split(split, seed, n_patches, n_vessel)
    save_npz(out_path, **patches)
    save_figure(montage_file, montage_figure(patches, seed))
    return patches


def montage_figure(patches, seed):
    """A figure of MONTAGE_PAIRS random patches, each image next to its label."""
    import matplotlib.pyplot as plt

    n_total = len(patches["img"])
    chosen = np.sort(np.random.default_rng(seed).choice(n_total, size=min(MONTAGE_PAIRS, n_total), replace=False))
    pairs_per_row = 4
    rows = -(-len(chosen) // pairs_per_row)
    fig, axes = plt.subplots(rows, 2 * pairs_per_row, figsize=(2 * pairs_per_row * 1.6, rows * 1.8), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for slot, i in enumerate(chosen):
        ax_img, ax_label = axes[slot // pairs_per_row, 2 * (slot % pairs_per_row):][:2]
        ax_img.imshow(patches["img"][i].T, cmap="gray", origin="lower")
        ax_label.imshow(patches["label"][i].T, cmap="gray", origin="lower", vmin=0, vmax=1)
        x, y, z = patches["centre"][i]
        ax_img.set_title(f"{patches['patient'][i]} ({x},{y},{z})", fontsize=6, loc="left")
    fig.suptitle("image patches (left of each pair) and vessel labels (right)", fontsize=9)
    return fig


def recorded_preparation(path):
    """Whether the patches file at path was cut from skull-stripped volumes (read without loading the patches)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return stripped_of({"skull_stripped": data["skull_stripped"]} if "skull_stripped" in data.files else {})
    except (ValueError, OSError, EOFError) as err:
        raise PipelineError(f"patches file {path} cannot be read as an npz file: {err}") from None


def ensure_patches(split):
    """The patches file of a split, extracted like `extract_patches.py --split <split>` if it is missing."""
    path = patches_path(split)
    if not path.is_file():
        print(f"{path} does not exist: extracting the {split} patches (as `extract_patches.py --split {split}`)",
              flush=True)
        write_patches(split, config.PATCH_SEED)
    else:
        check_preparation(recorded_preparation(path), f"patches file {path}",
                          f"python extract_patches.py --split {split} --overwrite")
    return path
