"""The networks a GAN run describes and their saved state: model_args and the networks built from them, the
checkpoints (models/<trial>/epoch_<e>.pth) with the accountant and RNG states, the public warm start (--init_from)
and what --resume checks and repairs.

A checkpoint is written last in an epoch and commits it: a run stopped before it leaves at most the epoch's log row
and figures, which --resume replaces by training the epoch again from the previous checkpoint.
"""

import random
import re
from pathlib import Path

import numpy as np
import torch

import config
from model import PATCH, DCGANCritic, DCGANGenerator, Discriminator, Generator
from utils.common import PipelineError, file_sha256, gan_model_dir, load_json, patches_path, remove_partial_files
from utils.data import preparation_name, stripped_of
from utils.gan_log import read_log

# Flags that may change when a trial is resumed: they do not change what is trained or how it is accounted.
RESUMABLE_CHANGES = ("resume", "epochs", "device", "grad_sample_mode", "max_physical_batch", "amp")
# Flags newer than some trials, with the value those trials ran with (absent from their config.json).
# Without the adaptive schedule its grace is moot: whatever the current default.
FLAGS_ADDED_LATER = {"audit_canaries": 0, "init_from": None, "max_physical_batch": None, "amp": False,
                     "adaptive_critic": None, "adaptive_grace": config.ADAPTIVE_GRACE}


def model_args(args):
    return dict(arch=args.arch, ngf=args.ngf, kg=args.kg, strg=args.strg, padg=args.padg, opg=args.opg,
                latent_dim=config.LATENT_DIM, upsampling=args.upsampling, ndf=args.ndf, kd=args.kd, strd=args.strd,
                label_scale=args.label_scale, patch_size=config.PATCH_SIZE)


# model_args keys that define the generator (the release bundle keeps these and no more)
GENERATOR_ARGS = ("arch", "ngf", "kg", "strg", "padg", "opg", "latent_dim", "upsampling", "label_scale", "patch_size")


def dcgan_widths(ngf):
    """The dcgan generator's widths at 1/16, 1/8, 1/4, 1/2 and 1 of the patch size (ngf 8: 96, 48, 24, 12, 8)."""
    return (12 * ngf, 6 * ngf, 3 * ngf, max(1, 3 * ngf // 2), ngf)


def build_generator(margs):
    """The generator of model_args (arch "paper", the default of checkpoints older than the flag, or "dcgan"; patch
    size 96 for checkpoints older than config.PATCH_SIZE's use here)."""
    size = margs.get("patch_size", PATCH)
    if margs.get("arch", "paper") == "dcgan":
        try:
            return DCGANGenerator(dcgan_widths(margs["ngf"]), margs["latent_dim"], size)
        except ValueError as err:
            raise PipelineError(f"config.PATCH_SIZE: {err}") from None
    if size != PATCH:
        raise PipelineError(f"config.PATCH_SIZE = {size}: the paper's networks (--arch paper) make {PATCH} x {PATCH} "
                            f"patches only; use --arch dcgan for another size")
    try:
        return Generator(margs["ngf"], margs["kg"], margs["strg"], margs["padg"], margs["opg"], margs["latent_dim"],
                         margs["upsampling"])
    except ValueError as err:
        raise PipelineError(f"generator flags --ngf/--kg/--strg/--padg/--opg: {err}") from None


def build_networks(margs):
    """(generator, critic) from model_args; sizes that cannot make the patch size are a PipelineError."""
    if margs.get("arch", "paper") == "dcgan":
        return build_generator(margs), DCGANCritic(margs["ndf"], margs.get("patch_size", PATCH))
    g = build_generator(margs)
    try:
        d = Discriminator(margs["ndf"], margs["kd"], margs["strd"])
    except ValueError as err:
        raise PipelineError(f"critic flags --kd/--strd: {err}") from None
    return g, d


def checkpoint_path(trial, epoch):
    return gan_model_dir(trial) / f"epoch_{epoch}.pth"


def checkpoint_epochs(trial):
    """Epochs with a checkpoint in the trial's model folder, ascending."""
    folder = gan_model_dir(trial)
    found = [re.fullmatch(r"epoch_(\d+)\.pth", p.name) for p in folder.glob("epoch_*.pth")] if folder.is_dir() else []
    return sorted(int(m.group(1)) for m in found if m)


def load_checkpoint(path, device="cpu"):
    """A checkpoint written by run_gan.py (plain tensors and containers: loads with weights_only)."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch raises many types for a damaged or foreign file
        raise PipelineError(f"checkpoint {path} cannot be read: {err}") from None


def rng_states(sampler_generator, noise_generator):
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "noise": noise_generator.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]),
                      float(np_state[4])),
            "python": random.getstate(), "sampler": sampler_generator.get_state()}


def restore_rng_states(states, sampler_generator, noise_generator):
    torch.set_rng_state(states["torch"])
    noise_generator.set_state(states["noise"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy(), int(pos), int(has_gauss), float(cached)))
    random.setstate(states["python"])
    sampler_generator.set_state(states["sampler"])


def start_from_public(generator, critic, path, margs, patches_sha256, skull_stripped):
    """Load the generator (its EMA where the checkpoint has one; the critic as trained) and the critic of a
    run_gan.py checkpoint trained on PUBLIC data (--init_from): a warm start that costs no privacy only because that
    data is not the patients'. Refused where the code can see otherwise (a checkpoint of this work folder, or of a
    run whose config.json records these very patches: patches_sha256); a copy elsewhere it cannot see. The networks
    must be the same (model_args), and so must the data preparation (skull_stripped: this run's patches); the
    optimizers start afresh. Returns the checkpoint's sha256."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"--init_from {path}: no such checkpoint (a run_gan.py epoch_<e>.pth of a run on public "
                            f"data)")
    if path.resolve().parent.parent == (config.WORK_DIR / "models").resolve():
        raise PipelineError(f"--init_from {path}: that GAN trained on this work folder's patches, the patients this "
                            f"run protects; starting from it would spend privacy the accountant does not count (a "
                            f"public start comes from a run in another work folder, on public data)")
    source = path.resolve().parent.parent.parent / "results" / path.resolve().parent.name / "config.json"
    source_config = load_json(source, "trial config") if source.is_file() else {}
    if source_config and stripped_of(source_config) != skull_stripped:
        raise PipelineError(f"--init_from {path}: its run ({source}) trained on "
                            f"{preparation_name(stripped_of(source_config))} patches, this run's are "
                            f"{preparation_name(skull_stripped)}; train the public GAN on data prepared the same way")
    if source_config.get("patches_sha256") == patches_sha256:
        raise PipelineError(f"--init_from {path}: its run ({source}) trained on the same patches file as this run, the "
                            f"patients this run protects; starting from it would spend privacy the accountant does "
                            f"not count")
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict) or not {"generator", "discriminator", "model_args"} <= checkpoint.keys():
        raise PipelineError(f"--init_from {path}: not a run_gan.py checkpoint (no generator, discriminator and "
                            f"model_args)")
    theirs = checkpoint["model_args"]
    different = [f"{k} {theirs.get(k)!r} (this run: {v!r})" for k, v in margs.items() if theirs.get(k) != v]
    if different:
        raise PipelineError(f"--init_from {path}: its networks differ from this run's: {'; '.join(different)}")
    generator.load_state_dict(checkpoint.get("generator_ema") or checkpoint["generator"])
    critic.load_state_dict(checkpoint["discriminator"])
    return file_sha256(path)


# ---- --resume: where a trial starts, the repairs of a stopped run, the settings it must keep ----
def start_epoch(args, model_dir, results_dir):
    """The epoch a run of trial args.trial starts at: 0 for a new trial and for one whose run stopped in epoch 0 (it
    starts again, with or without --resume, so that a requeued job runs); with --resume the epoch after the newest
    complete one. An epoch is complete once its checkpoint is written (after the epoch's log row and samples).
    Repairs what a stopped run left: its temporary files are removed, and the checkpoint of an epoch without a log row
    (versions that wrote the checkpoint first) is removed and the epoch trained again. Refuses to start over a trial
    with a complete epoch."""
    trial, folders = args.trial, (model_dir, results_dir)
    if not any(folder.exists() for folder in folders):
        if args.resume:
            raise PipelineError(f"--resume: trial {trial!r} has nothing to resume (no folder {model_dir} or "
                                f"{results_dir}); start it without --resume")
        return 0
    epochs, log_path = checkpoint_epochs(trial), results_dir / "log.csv"
    logged = [row["epoch"] for row in read_log(log_path)]
    if epochs and not logged and epochs[-1] > 0:
        raise PipelineError(f"trial {trial!r} has checkpoints up to epoch {epochs[-1]} but no {log_path}, which "
                            f"says which epochs are complete; restore it, or delete the trial to start again")
    unlogged = []  # the newest checkpoints without a log row: their epochs are not complete
    while epochs and epochs[-1] not in logged:
        unlogged.insert(0, epochs.pop())
    if epochs and not args.resume:
        raise PipelineError(f"trial {trial!r} exists already ({model_dir}, epochs up to {epochs[-1]}); pass "
                            f"--resume to continue it or choose another --trial (nothing was written)")
    for folder in folders:
        removed = remove_partial_files(folder)
        if removed:
            print(f"trial {trial!r}: removed {', '.join(removed)} from {folder}: partly written when a run was "
                  f"stopped", flush=True)
    for epoch in unlogged:
        remove_unlogged_checkpoint(trial, epoch, epochs[-1] if epochs else None)
    if not epochs:
        print(f"trial {trial!r} has no complete epoch (its run stopped in epoch 0): it starts again from epoch 0",
              flush=True)
        return 0
    if logged[-1] > epochs[-1]:
        print(f"--resume: epoch {epochs[-1] + 1} of trial {trial!r} was left half-done (its log row and samples "
              f"were written, its checkpoint not): it is trained again from the checkpoint of epoch {epochs[-1]}",
              flush=True)
    return epochs[-1] + 1


def remove_unlogged_checkpoint(trial, epoch, previous):
    """Remove the checkpoint of a half-done epoch. Not kept: its epoch is trained again with the restored RNG states,
    so the same batches and noise draws; two models of one noise draw, computed even slightly differently (another
    engine, --amp, device), would release a noise-free difference the accountant does not count."""
    path = checkpoint_path(trial, epoch)
    path.unlink()
    since = f"from the checkpoint of epoch {previous}" if previous is not None else "from the start"
    print(f"trial {trial!r}: epoch {epoch} was left half-done (its checkpoint has no row in log.csv: the "
          f"run was stopped between them); its checkpoint {path} is removed and epoch {epoch} is trained again "
          f"{since}", flush=True)


def check_resumed_settings(args, results_dir, n_samples, patches_sha256):
    """--resume: the trial must have been run with these flags, on this patches file."""
    trial, config_path = args.trial, results_dir / "config.json"
    if not config_path.is_file():
        raise PipelineError(f"--resume: trial {trial!r} has checkpoints but no {config_path}, which records its "
                            f"settings; restore it, or delete the trial to start again")
    stored = load_json(config_path, "trial config")
    ran = {**FLAGS_ADDED_LATER, **stored["args"]}
    different = [f"--{k} {v!r} (the trial has {ran.get(k)!r})" for k, v in vars(args).items()
                 if k not in RESUMABLE_CHANGES and ran.get(k) != v]
    stored_size = stored.get("config", {}).get("PATCH_SIZE", PATCH)
    if stored_size != config.PATCH_SIZE:
        different.append(f"config.PATCH_SIZE {config.PATCH_SIZE} (the trial has {stored_size})")
    if stored.get("n_samples") != n_samples:
        different.append(f"the patches file now has {n_samples} patches (the trial had {stored['n_samples']})")
    recorded = stored.get("patches_sha256")
    if recorded and recorded != patches_sha256:
        different.append(f"the patches file {patches_path('train')} has changed since the trial started (sha256 "
                         f"{patches_sha256[:12]}..., config.json records {recorded[:12]}...): training on it "
                         f"would mix two data sets in one model and one epsilon; restore that file or start a "
                         f"new --trial")
    if different:
        raise PipelineError(f"--resume: trial {trial!r} was started with other settings: {'; '.join(different)}")
