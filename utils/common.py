"""Helpers every script shares: clear errors, atomic writes, paths, scaling, devices."""

import errno
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

import config

_UMASK = os.umask(0)
os.umask(_UMASK)


class PipelineError(Exception):
    """A problem with the user's input or files; scripts print its message and exit with code 2."""


def script_main(main):
    """Run a script's main(); a PipelineError, or an OSError of WRITE_FAILURES, becomes one line on stderr and exit
    code 2."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except PipelineError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except OSError as err:  # a full disk or a read-only folder that no check above caught: still one line
            if err.errno not in WRITE_FAILURES:
                raise
            print(f"error: {err.filename or 'a file'}: {WRITE_FAILURES[err.errno]}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


def print_setup(script):
    print(f"[{script}] preset: {config.PRESET} | data: {config.DATA_DIR} | work: {config.WORK_DIR}", flush=True)


# Why a write failed, in words, for the errors a user can fix (free space, permissions, a read-only mount).
WRITE_FAILURES = {errno.ENOSPC: "no space left on the disk", errno.EDQUOT: "the disk quota is exceeded",
                  errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                  errno.EROFS: "the file system is read-only"}
# atomic_write's temporary files: "." + the file's name + "." + mkstemp's 8 random characters (+ suffix). One that
# is left behind was being written when its process was killed.
PARTIAL_FILE = re.compile(r"\..+\.[a-z0-9_]{8}(\.[^.]*)?")


def write_failure(path, err, what="file"):
    """A PipelineError for an OSError while writing `what` at `path`: one line with the path and the reason."""
    reason = WRITE_FAILURES.get(err.errno, err.strerror or str(err))
    return PipelineError(f"cannot write the {what} {path}: {reason} (the file as it was is kept; free space or fix "
                         f"the folder's permissions and run again)")


def atomic_write(path, write, what="file"):
    """Call write(tmp_path) and move the result to path, so a crash never leaves half a file. A full disk, a
    read-only folder or missing permissions become a PipelineError naming the path (write_failure)."""
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; outputs are shared like any other file
        os.replace(tmp, path)
    except OSError as err:
        raise write_failure(path, err, what) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    return path


def remove_partial_files(folder):
    """Delete the temporary files atomic_write left in `folder` when its process was killed mid-write (call it only
    while owning the folder: utils.locks). Returns their names."""
    folder = Path(folder)
    partial = sorted(p for p in folder.iterdir() if p.is_file() and PARTIAL_FILE.fullmatch(p.name)) \
        if folder.is_dir() else []
    for path in partial:
        path.unlink()
    return [p.name for p in partial]


def check_writable(folder, what, need_bytes=0):
    """Before a long computation: `folder` can be created and written and has need_bytes free, or a PipelineError
    says which folder and why (nothing has been computed yet)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
        free = shutil.disk_usage(folder).free
    except OSError as err:
        reason = WRITE_FAILURES.get(err.errno, err.strerror or str(err))
        raise PipelineError(f"cannot write the {what} in {folder}: {reason}; nothing was computed") from None
    if free < need_bytes:
        raise PipelineError(f"the {what} need about {need_bytes / 1e6:.3g} MB in {folder}, which has "
                            f"{free / 1e6:.3g} MB free; free space and run again (nothing was computed)")


def save_npz(path, **arrays):
    return atomic_write(path, lambda tmp: np.savez(tmp, **arrays))


def save_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=_json_default, allow_nan=True)
            f.write("\n")

    return atomic_write(path, write)


def save_torch(path, obj):
    import torch

    def write(tmp):
        with open(tmp, "wb") as f:
            try:
                torch.save(obj, f)
            except RuntimeError as err:  # torch reports a failed write as "unexpected pos"; the OSError is its cause
                if isinstance(err.__context__, OSError):
                    raise err.__context__ from None
                raise

    return atomic_write(path, write)


def save_figure(path, fig):
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png"))
    plt.close(fig)
    return path


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def load_npz(path, keys, what="file"):
    """Load an npz and check it holds `keys`; a clear error names the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{what} {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise PipelineError(f"{what} {path} lacks the arrays {missing} (it has {data.files})")
            return {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError) as err:
        raise PipelineError(f"{what} {path} cannot be read as an npz file: {err}") from None


def load_json(path, what="file", missing_hint=""):
    """Parse a JSON file; a clear error names the file when it is missing or not valid JSON."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{what} {path} does not exist{missing_hint}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PipelineError(f"{what} {path} is not valid JSON: {err}") from None


def file_sha256(path):
    """Hex SHA-256 of a file's bytes, read in chunks (a training set can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def refuse_existing(path, flag="--overwrite"):
    if Path(path).exists():
        raise PipelineError(f"{path} exists already; pass {flag} to replace it (nothing was written)")


def minmax_scale(x, low, high):
    """Scale each patch (the last two axes) of x linearly to [low, high]; a flat patch becomes low."""
    x = np.asarray(x, dtype=np.float32)
    lo = x.min(axis=(-2, -1), keepdims=True)
    span = x.max(axis=(-2, -1), keepdims=True) - lo
    unit = np.divide(x - lo, span, out=np.zeros_like(x), where=span > 0)
    return (low + (high - low) * unit).astype(np.float32)


def resolve_device(name=None):
    import torch

    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"--device {name}: no CUDA device is available here")
    return torch.device(name)


def versions():
    import opacus
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "opacus": opacus.__version__,
            "numpy": np.__version__}


def config_values():
    """The upper-case settings of config.py as JSON-ready values, for writing next to results."""
    return {k: _plain(v) for k, v in vars(config).items() if k.isupper()}


def _plain(v):
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    return v


# ---- paths of the pipeline's outputs, one definition each ----
def patches_path(split="train"):
    return config.WORK_DIR / "patches" / f"{split}_patches.npz"


def gan_model_dir(trial, work_dir=None):
    """A trial's checkpoints, in config.WORK_DIR or another work folder (demo.py's public GAN)."""
    return Path(work_dir or config.WORK_DIR) / "models" / f"WGAN_{trial}"


def gan_results_dir(trial, work_dir=None):
    return Path(work_dir or config.WORK_DIR) / "results" / f"WGAN_{trial}"


def synthetic_name(trial, epoch, thresh):
    return f"DP_{trial}_{epoch}_{thresh}"


def synthetic_path(trial, epoch, thresh):
    return config.WORK_DIR / "synthetic" / f"gen_patches_{synthetic_name(trial, epoch, thresh)}.npz"


def train_input_name(args):
    """'real' for --real, else the synthetic set's name; used for U-Net and result folders."""
    return "real" if getattr(args, "real", False) else synthetic_name(args.trial, args.epoch, args.thresh)


def add_synthetic_set_args(parser):
    """The flags that name a synthetic set: --trial, --epoch (as given to generate_samples.py), --thresh."""
    parser.add_argument("--trial", default=None, help="GAN trial of the synthetic set")
    parser.add_argument("--epoch", type=int, default=None,
                        help="epoch of the synthetic set, as given to generate_samples.py")
    parser.add_argument("--thresh", type=float, default=config.THRESH, help="label threshold of the synthetic set")


def add_training_input_args(parser, real_help):
    """The flags that choose a U-Net training input (run_unet.py, eval_unet.py): a synthetic set or --real."""
    add_synthetic_set_args(parser)
    parser.add_argument("--real", action="store_true", help=real_help)


def add_device_arg(parser):
    parser.add_argument("--device", default="auto", help="auto (GPU if there is one), cpu, cuda, cuda:1, ...")


def training_input(args):
    """(name, data file) of the training input the flags choose; errors name the flag or the missing file."""
    if args.real == (args.trial is not None):
        raise PipelineError("give either --real or --trial (with --epoch and --thresh), not both or neither")
    if args.real:
        path = patches_path("train")
        if not path.is_file():
            raise PipelineError(f"real training patches {path} do not exist; make them with "
                                f"`python extract_patches.py --split train`")
        return "real", path
    if args.epoch is None:
        raise PipelineError("--trial needs --epoch (the synthetic set's epoch as given to generate_samples.py)")
    path = synthetic_path(args.trial, args.epoch, args.thresh)
    if not path.is_file():
        raise PipelineError(f"synthetic set {path} does not exist; make it with `python generate_samples.py "
                            f"--trial {args.trial} --epoch {args.epoch} --thresh {args.thresh}`")
    return train_input_name(args), path


def run_unet_command(args):
    """The run_unet.py command line that trains the U-Nets of the training input the flags choose."""
    if args.real:
        return "python run_unet.py --real"
    return f"python run_unet.py --trial {args.trial} --epoch {args.epoch} --thresh {args.thresh}"


def unet_dir(train_input):
    return config.WORK_DIR / "unets" / train_input


def result_paths(train_input):
    """(txt, json) result files of eval_unet.py; suffixes appended, as the name may hold a dot (thresh 0.8)."""
    stem = config.WORK_DIR / "results" / f"{train_input}_results"
    return Path(f"{stem}.txt"), Path(f"{stem}.json")
