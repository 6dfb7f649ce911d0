"""Loading, checking and preparing the TOF-MRA volumes: DATA_DIR/<split>/<patient>_{img,label,mask}.nii.gz.

Every problem with the data becomes one PipelineError that names the patient, the file and what is wrong,
so a script can stop before it writes anything.

Preparation, as the authors did (README, "Data preparation: skull stripping"): with config.SKULL_STRIP the image and the
label are multiplied by the brain mask as the volume is loaded, so every patch, prediction and score sees the brain
only, never the skull and the bright scalp fat of a raw TOF-MRA scan. Every output that derives from volumes
records whether they were stripped (`skull_stripped`), and a U-Net refuses volumes prepared otherwise than the
patches it learned from.
"""

from collections import namedtuple
from pathlib import Path

import nibabel as nib
import numpy as np

import config
from utils.common import PipelineError

Volume = namedtuple("Volume", "img label mask affine spacing patient split skull_stripped")
Volume.__doc__ = """One patient: img float32 (X,Y,Z), label and mask uint8 0/1, affine 4x4, spacing (mm, 3 floats);
skull_stripped: img and label were multiplied by the mask."""

VolumeHeader = namedtuple("VolumeHeader", "shape affine spacing patient split")
VolumeHeader.__doc__ = """What the NIfTI headers of one patient say, read without loading the voxels."""

KINDS = ("img", "label", "mask")
AFFINE_TOLERANCE = 1e-4  # mm; headers written by different tools round the affine differently


def patient_ids(split):
    """The patient ids of a split (config.PATIENT_IDS); an unknown split is a PipelineError."""
    if split not in config.PATIENT_IDS:
        raise PipelineError(f"unknown split {split!r}; the splits are {', '.join(config.PATIENT_IDS)}")
    return list(config.PATIENT_IDS[split])


def patient_paths(split, patient, data_dir=None):
    """{'img': path, 'label': path, 'mask': path} of one patient (paths only; nothing is checked)."""
    folder = Path(config.DATA_DIR if data_dir is None else data_dir) / split
    return {kind: folder / f"{patient}_{kind}.nii.gz" for kind in KINDS}


def load_patient(split, patient, data_dir=None, skull_strip=None):
    """Load, check and prepare one patient's image, vessel label and brain mask; returns a Volume.

    skull_strip (default config.SKULL_STRIP): multiply image and label by the brain mask."""
    skull_strip = config.SKULL_STRIP if skull_strip is None else bool(skull_strip)
    images = _open_checked(split, patient, data_dir)
    paths = patient_paths(split, patient, data_dir)
    img = _read(images["img"], paths["img"], patient, "the image", lambda nii: nii.get_fdata(dtype=np.float32))
    n_bad = img.size - int(np.count_nonzero(np.isfinite(img)))
    if n_bad:
        raise PipelineError(f"patient {patient}: image {paths['img']} has {n_bad} voxels that are NaN or infinite "
                            f"(of {img.size}); repair or re-export the scan (nothing was written)")
    label = _read_binary(images["label"], paths["label"], patient, "vessel label")
    mask = _read_binary(images["mask"], paths["mask"], patient, "brain mask")
    if skull_strip:
        img, label = img * mask, label * mask
    header = _header(images["img"], patient, split)
    return Volume(img, label, mask, header.affine, header.spacing, patient, split, skull_strip)


def stripped_of(record):
    """Whether a patches file's arrays or a run's JSON record say its volumes were skull-stripped. Files written
    before the setting existed record nothing: their volumes were raw."""
    value = record.get("skull_stripped", False)
    return bool(np.asarray(value)) if value is not None else False


def preparation_name(skull_stripped):
    return "skull-stripped (image and label x brain mask)" if skull_stripped else "raw (not skull-stripped)"


def check_preparation(recorded_stripped, what, remedy):
    """Refuse to use something made from volumes prepared one way (skull-stripped or raw) where volumes are now read
    the other way (config.SKULL_STRIP): a U-Net that never saw a scalp marks it as vessel, and the other way round.
    what: the output, named with its path; remedy: the command that makes it again."""
    if bool(recorded_stripped) != bool(config.SKULL_STRIP):
        raise PipelineError(f"{what} was made from {preparation_name(recorded_stripped)} volumes, but "
                            f"config.SKULL_STRIP is {config.SKULL_STRIP}, so volumes are now read "
                            f"{preparation_name(config.SKULL_STRIP)}; set SKULL_STRIP = {bool(recorded_stripped)} in "
                            f"config.py, or make it again from the volumes as they are now read (`{remedy}`); nothing "
                            f"was written")


def read_header(split, patient, data_dir=None):
    """Check one patient's files exist and agree in shape and affine, reading only the headers."""
    return _header(_open_checked(split, patient, data_dir)["img"], patient, split)


def validate_split(split, data_dir=None):
    """Check every patient of a split from the headers (files exist, shapes and affines agree).

    Returns the list of VolumeHeader in the order of config.PATIENT_IDS[split]. The voxel values
    (binary label and mask) are checked by load_patient.
    """
    return [read_header(split, patient, data_dir) for patient in patient_ids(split)]


def _open_checked(split, patient, data_dir):
    paths = patient_paths(split, patient, data_dir)
    folder = paths["img"].parent
    if not folder.parent.is_dir():
        raise PipelineError(f"data folder {folder.parent} does not exist (set DPGAN_DATA_DIR or generate the "
                            f"phantoms first)")
    if not folder.is_dir():
        raise PipelineError(f"patient {patient}: split folder {folder} does not exist")
    images = {}
    for kind, path in paths.items():
        if not path.is_file():
            raise PipelineError(f"patient {patient}: {kind} file {path} does not exist")
        try:
            images[kind] = nib.load(path)
        except Exception as err:  # nibabel raises many types for a damaged file
            raise PipelineError(f"patient {patient}: {kind} file {path} cannot be read as NIfTI: {err}") from None
    shapes = {kind: tuple(nii.shape) for kind, nii in images.items()}
    if len(shapes["img"]) != 3:
        raise PipelineError(f"patient {patient}: image {paths['img']} has shape {shapes['img']}, not 3-D (x, y, z)")
    for kind in ("label", "mask"):
        if shapes[kind] != shapes["img"]:
            raise PipelineError(f"patient {patient}: {kind} {paths[kind]} has shape {shapes[kind]} but the image "
                                f"{paths['img']} has shape {shapes['img']}")
        if not np.allclose(images[kind].affine, images["img"].affine, atol=AFFINE_TOLERANCE):
            theirs, image_affine = (_one_line(images[k].affine) for k in (kind, "img"))
            raise PipelineError(f"patient {patient}: the affine of {kind} {paths[kind]} differs from the image's "
                                f"({paths['img']}): {theirs} vs {image_affine}")
    return images


def _one_line(affine):
    return str(np.asarray(affine).round(4).tolist())


def _header(nii, patient, split):
    spacing = tuple(round(float(z), 6) for z in nii.header.get_zooms()[:3])  # zooms are float32: 0.7 not 0.69999
    return VolumeHeader(tuple(nii.shape), np.asarray(nii.affine, dtype=np.float64), spacing, patient, split)


def _read(nii, path, patient, what, get):
    try:
        return get(nii)
    except Exception as err:  # a truncated or corrupt .gz fails only when the voxels are read
        raise PipelineError(f"patient {patient}: {what} {path} cannot be read: {err}") from None


def _read_binary(nii, path, patient, what):
    values = _read(nii, path, patient, f"the {what}", lambda n: np.asanyarray(n.dataobj))
    if values.dtype == np.uint8:
        binary = values.max(initial=0) <= 1
    else:
        binary = bool(np.all((values == 0) | (values == 1)))
    if not binary:
        found = np.unique(values)
        shown = ", ".join(f"{v:g}" for v in found[:6]) + (", ..." if found.size > 6 else "")
        raise PipelineError(f"patient {patient}: {what} {path} is not binary (values {shown}; expected 0 and 1)")
    return values.astype(np.uint8, copy=False)
