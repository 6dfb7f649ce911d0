"""Finding, checking and loading the TOF-MRA volumes: DATA_DIR/<split>/<patient>_{img,label,mask}.nii.gz.

A split's patients are those config.PATIENT_IDS lists for it, else those whose files are in its folder (docs/
real-data.md). Every problem with the data becomes one PipelineError that names the patient, the file and what is
wrong, so a script can stop before it writes anything; survey_data collects every problem of a data folder from the
headers instead (`python extract_patches.py --check`).

Preparation, as the authors did (docs/method.md, "Data and skull stripping"): with config.SKULL_STRIP the image and the
label are multiplied by the brain mask as the volume is loaded, so every patch, prediction and score sees the brain
only, never the skull and the bright scalp fat of a raw TOF-MRA scan. Every output that derives from volumes
records whether they were stripped (`skull_stripped`), and a U-Net refuses volumes prepared otherwise than the
patches it learned from.
"""

import re
from collections import Counter, namedtuple
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

SplitSurvey = namedtuple("SplitSurvey", "split folder patients headers problems")
SplitSurvey.__doc__ = """One split as survey_data found it: its patient ids, the VolumeHeader of each patient whose
headers passed, and every problem (text naming the patient and file)."""

KINDS = ("img", "label", "mask")
PATIENT_FILE = re.compile(r"(?P<patient>.+)_(?P<kind>img|label|mask)\.nii\.gz")
FILE_NAMES = "<patient>_img.nii.gz, <patient>_label.nii.gz and <patient>_mask.nii.gz"
AFFINE_TOLERANCE = 1e-4  # mm; headers written by different tools round the affine differently
SPACING_TOLERANCE = 1e-3  # relative; pixdim and the affine are stored in float32, rounded by the tool that wrote them


def known_splits():
    """config.SPLITS, then any other split config.PATIENT_IDS lists."""
    return list(dict.fromkeys([*config.SPLITS, *(config.PATIENT_IDS or {})]))


def patient_ids(split, data_dir=None):
    """The patient ids of a split: those config.PATIENT_IDS lists for it (listing wins), else those whose files are in
    the split's folder, sorted. An unknown split, a missing or empty split folder, a stray file there and a patient
    without all three files are PipelineErrors (every problem of the folder in one)."""
    listed = config.PATIENT_IDS or {}
    if split in listed:
        return list(listed[split])
    if split not in config.SPLITS:
        raise PipelineError(f"unknown split {split!r}; the splits are {', '.join(known_splits())}")
    found, problems = find_patients(split, data_dir)
    problems += [p for patient in found for p in _missing_files(patient, patient_paths(split, patient, data_dir))]
    _raise_all(problems, f"{len(problems)} problems in split folder {split_folder(split, data_dir)} (config."
                         f"PATIENT_IDS does not list split {split!r}, so its patients are found from these files)")
    return found


def find_patients(split, data_dir=None):
    """(patient ids, problems) from the file names in a split's folder: the ids sorted, a patient found from any of
    its three files; a missing or empty folder and each stray file are problems. Files whose names start with "."
    (a file manager's, or one being written) are not looked at."""
    folder = split_folder(split, data_dir)
    missing = _missing_folder(folder)
    if missing:
        return [], [missing]
    patients, problems = set(), []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        match = PATIENT_FILE.fullmatch(path.name)
        if match and path.is_file():
            patients.add(match["patient"])
        else:
            problems.append(f"stray {'folder' if path.is_dir() else 'file'} {path.name} in {folder}: every entry of "
                            f"a split folder is one of a patient's {FILE_NAMES}")
    if not patients and not problems:
        problems.append(f"split folder {folder} is empty: it should hold each patient's {FILE_NAMES}")
    return sorted(patients), problems


def split_folder(split, data_dir=None):
    return Path(config.DATA_DIR if data_dir is None else data_dir) / split


def patient_paths(split, patient, data_dir=None):
    """{'img': path, 'label': path, 'mask': path} of one patient (paths only; nothing is checked)."""
    folder = split_folder(split, data_dir)
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
    """Check one patient's files exist, the image is 3-D with consistent spacing and the label and mask are on its
    grid (shape, affine), reading only the headers."""
    return _header(_open_checked(split, patient, data_dir)["img"], patient, split)


def validate_split(split, data_dir=None):
    """Check every patient of a split from the headers (as read_header), stopping at the first problem.

    Returns the list of VolumeHeader in the order of patient_ids(split). The voxel values
    (binary label and mask) are checked by load_patient.
    """
    return [read_header(split, patient, data_dir) for patient in patient_ids(split, data_dir)]


def survey_data(data_dir=None, header_checks=()):
    """Every split of known_splits() checked from the headers as the pipeline will read it, collecting every problem
    instead of stopping at the first; returns a SplitSurvey per split. header_checks: functions of a VolumeHeader
    that raise a PipelineError for a volume the caller cannot use (each is one more problem)."""
    data_dir = Path(config.DATA_DIR if data_dir is None else data_dir)
    if not data_dir.is_dir():
        raise PipelineError(_missing_data_folder(data_dir))
    return [_survey_split(split, data_dir, header_checks) for split in known_splits()]


def _survey_split(split, data_dir, header_checks):
    folder = split_folder(split, data_dir)
    if split in (config.PATIENT_IDS or {}):
        patients, missing = list(config.PATIENT_IDS[split]), _missing_folder(folder)
        problems = [missing] if missing else []
    else:
        patients, problems = find_patients(split, data_dir)
    headers = []
    for patient in patients if folder.is_dir() else []:
        images, found = _open_patient(patient, patient_paths(split, patient, data_dir))
        if not found:
            header = _header(images["img"], patient, split)
            for check in header_checks:
                try:
                    check(header)
                except PipelineError as err:
                    found.append(str(err))
            headers.append(header)
        problems += found
    return SplitSurvey(split, folder, patients, headers, problems)


def summary_table(surveys):
    """The surveys as a plain-text table: split, patients, the shapes and voxel spacings found, problems."""

    def sizes(values, unit=""):
        counts = Counter("x".join(f"{v:g}" for v in value) + unit for value in values)
        if len(counts) == 1:
            return next(iter(counts))
        shown = [f"{value} ({n})" for value, n in counts.most_common(3)]
        return ", ".join(shown + ([f"{len(counts) - 3} more"] if len(counts) > 3 else [])) or "-"

    rows = [("split", "patients", "shape(s), voxels", "voxel spacing(s)", "problems")]
    for survey in surveys:
        patients = str(len(survey.patients)) if survey.folder.is_dir() else "no folder"
        rows.append((survey.split, patients, sizes(h.shape for h in survey.headers),
                     sizes((h.spacing for h in survey.headers), " mm"), str(len(survey.problems))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join([lines[0], "  ".join("-" * width for width in widths), *lines[1:]])


def _raise_all(problems, heading):
    """One PipelineError for every problem found: the problem itself, or the heading and each on its own line."""
    if problems:
        raise PipelineError(problems[0] if len(problems) == 1 else f"{heading}:\n  " + "\n  ".join(problems))


def _missing_folder(folder):
    """Why a split folder cannot be read (None if it is a folder)."""
    if not folder.parent.is_dir():
        return _missing_data_folder(folder.parent)
    if not folder.is_dir():
        return (f"split folder {folder} does not exist: it should hold each {folder.name} patient's {FILE_NAMES} "
                f"(docs/real-data.md)")
    return None


def _missing_data_folder(data_dir):
    return f"data folder {data_dir} does not exist (set DPGAN_DATA_DIR or generate the phantoms first)"


def _missing_files(patient, paths):
    missing = {kind: path for kind, path in paths.items() if not path.is_file()}
    folder = paths["img"].parent
    if len(missing) == len(paths):  # a listed id without files: one line, not three
        return [f"patient {patient}: none of its files ({', '.join(p.name for p in paths.values())}) is in folder "
                f"{folder}"]
    return [f"patient {patient}: its {kind} file {path.name} is missing from folder {folder}"
            for kind, path in missing.items()]


def _open_checked(split, patient, data_dir):
    """The patient's three images (headers read, voxels not), or a PipelineError with every problem of their headers."""
    paths = patient_paths(split, patient, data_dir)
    missing = _missing_folder(paths["img"].parent)
    if missing:
        raise PipelineError(missing)
    images, problems = _open_patient(patient, paths)
    _raise_all(problems, f"patient {patient}: {len(problems)} problems with its files")
    return images


def _open_patient(patient, paths):
    """(images opened so far, every problem): files exist and open as NIfTI, the image 3-D with the voxel spacing of
    its affine in its header, and the label and mask on the image's grid (same shape, affine within AFFINE_TOLERANCE).
    Only the headers are read."""
    problems = _missing_files(patient, paths)
    images = {}
    for kind, path in paths.items():
        if not path.is_file():
            continue
        try:
            images[kind] = nib.load(path)
        except Exception as err:  # nibabel raises many types for a damaged file
            problems.append(f"patient {patient}: {kind} file {path} cannot be read as NIfTI: {err}")
    if "img" not in images:
        return images, problems
    shape = tuple(images["img"].shape)
    if len(shape) != 3:
        problems.append(f"patient {patient}: image {paths['img']} has shape {shape}, not 3-D (x, y, z)")
        return images, problems
    spacing = np.asarray(images["img"].header.get_zooms()[:3], dtype=float)
    affine_spacing = np.linalg.norm(images["img"].affine[:3, :3], axis=0)
    if not np.allclose(spacing, affine_spacing, rtol=SPACING_TOLERANCE, atol=0):
        problems.append(f"patient {patient}: image {paths['img']} has voxel spacing {_one_line(spacing)} mm in its "
                        f"header (pixdim) but {_one_line(affine_spacing)} mm in its affine; distances in mm (the "
                        f"Hausdorff distance) use the header's, so re-export the scan with the two agreeing")
    for kind in ("label", "mask"):
        if kind not in images:
            continue
        if tuple(images[kind].shape) != shape:
            problems.append(f"patient {patient}: {kind} {paths[kind]} has shape {tuple(images[kind].shape)} but the "
                            f"image {paths['img']} has shape {shape}")
        elif not np.allclose(images[kind].affine, images["img"].affine, atol=AFFINE_TOLERANCE):
            theirs, image_affine = (_one_line(images[k].affine) for k in (kind, "img"))
            problems.append(f"patient {patient}: the affine of {kind} {paths[kind]} differs from the image's "
                            f"({paths['img']}): {theirs} vs {image_affine}")
    return images, problems


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
