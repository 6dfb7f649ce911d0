"""One owner at a time for an output that a run builds over minutes or days: a GAN trial, a synthetic set, a U-Net
folder, a sweep. Two runs writing one trial would mix their checkpoints, logs and configs.

`owned(target, what)` holds the lock file `.<name>.lock` beside `target` (beside, not inside: a trial's folder must
not exist before its run has checked it) while its block runs. The file is created with O_CREAT | O_EXCL, so of two
runs started together exactly one gets it, and records the owner's pid, host, start time and command. A second run
is refused with a message naming the owner. A lock is stale, and taken over, when its host is this one and its pid
is gone, or when it belongs to an earlier run of this very SLURM job (a requeued job starts on any node, after its
first run ended; SLURM counts its restarts, so a live sibling task of the same run is not taken for an earlier run).
A lock of a live process on another host can only be removed by hand; the message says which file. A stale lock is
moved aside atomically before it is removed, so of two runs taking over one stale lock only one succeeds.
"""

import datetime
import json
import os
import secrets
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from utils.common import WRITE_FAILURES, PipelineError

HALF_WRITTEN_AFTER_S = 30  # an unreadable lock this old was left by a process killed while writing it
HELD = []  # the records of the locks this process holds


def lock_path(target):
    target = Path(target)
    return target.parent / f".{target.name}.lock"


def slurm_job():
    """This process's SLURM job (array job and task for an array: each task is one job), or None."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def slurm_restarts():
    """How often SLURM has restarted (requeued) this job: 0 for its first run and outside SLURM."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def this_owner():
    return {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job": slurm_job(),
            "slurm_restarts": slurm_restarts(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)}


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def stale_reason(owner):
    """Why the lock of `owner` (a dict read from a lock file) no longer holds, or None while its owner may run."""
    here, pid = socket.gethostname(), owner.get("pid")
    if (owner.get("slurm_job") and owner["slurm_job"] == slurm_job()
            and int(owner.get("slurm_restarts") or 0) < slurm_restarts()):
        return f"its SLURM job {owner['slurm_job']} was requeued (this is its new run)"
    if owner.get("host") != here:
        return None
    if not isinstance(pid, int) or pid <= 0:
        return "it names no process"
    if pid == os.getpid() and owner not in HELD:  # an earlier process had this pid (a restarted container)
        return f"process {pid} on this host was an earlier run"
    return None if process_alive(pid) else f"process {pid} on this host has ended"


def read_owner(path):
    """The owner recorded in a lock file; {} if it is unreadable (being written, or left half-written); None if it
    is gone."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def try_create(path, owner):
    """Create the lock file with owner's record; False if it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(owner, f)
    return True


def remove_if_still(path, owner):
    """Remove the lock file `path` if it still records `owner`; True if it did. The file is first renamed aside, which
    only one of several runs can do: had another run meanwhile taken the lock over, its lock is put back."""
    aside = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    if read_owner(aside) != owner:
        try:
            os.link(aside, path)  # a newer run's lock, back in place (unless a third run holds the name by now)
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True


def describe(owner):
    return (f"process {owner.get('pid')} on host {owner.get('host')}, started {owner.get('started')}"
            + (f" ({owner['command']})" if owner.get("command") else ""))


def acquire(path, what):
    """Take the lock file `path` for `what`, taking over a stale one; returns this process's record."""
    mine = this_owner()
    for _ in range(5):  # a few rounds: another run may take over the same stale lock between two looks
        if try_create(path, mine):
            return mine
        owner = read_owner(path)
        if owner is None:
            continue  # released meanwhile
        if owner:
            reason = stale_reason(owner)
        else:
            age = time.time() - path.stat().st_mtime if path.exists() else 0
            reason = "it was left half-written" if age > HALF_WRITTEN_AFTER_S else None
            if reason is None:
                time.sleep(0.1)  # being written right now
                continue
        if reason is None:
            raise PipelineError(f"{what} is in use by {describe(owner)} (lock {path}); wait until it ends, or choose "
                                f"another name. If that process is gone (its node failed), delete {path}. Nothing "
                                f"was written")
        if remove_if_still(path, owner):
            print(f"{what}: taking over the lock {path} of {describe(owner) if owner else 'an unknown run'}: "
                  f"{reason}", flush=True)
    raise PipelineError(f"{what}: could not take the lock {path}; other runs keep taking it (nothing was written)")


@contextmanager
def owned(target, what):
    """Hold the lock of `target` (a folder or file of outputs) for `what` while the block runs; PipelineError if
    another live run holds it. A parent folder created only for the lock is removed again if left empty."""
    path = lock_path(target)
    created = not path.parent.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mine = acquire(path, what)
    except OSError as err:
        reason = WRITE_FAILURES.get(err.errno, err.strerror or str(err))
        raise PipelineError(f"cannot write the lock {path} of {what}: {reason} (nothing was written)") from None
    HELD.append(mine)
    try:
        yield mine
    finally:
        HELD.remove(mine)
        if read_owner(path) == mine:
            path.unlink(missing_ok=True)
        if created:
            try:
                path.parent.rmdir()
            except OSError:  # not empty: the run wrote its outputs there
                pass
