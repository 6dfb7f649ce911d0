"""utils/locks.py: one run at a time owns a trial, a set, a U-Net folder or a sweep; a dead owner's lock is taken."""

import json
import os
import socket
import subprocess
import sys

import pytest

from utils.common import PipelineError
from utils.locks import lock_path, owned


def dead_pid():
    """The pid of a process that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_second_owner_is_refused_by_name_while_the_first_holds_it(tmp_path):
    target = tmp_path / "results" / "WGAN_t"
    with owned(target, "GAN trial 't'") as mine:
        lock = lock_path(target)
        assert json.loads(lock.read_text()) == mine and mine["pid"] == os.getpid()
        with pytest.raises(PipelineError, match=rf"GAN trial 't' is in use by process {os.getpid()} on host "
                                                rf"{socket.gethostname()}.*delete {lock}"):
            with owned(target, "GAN trial 't'"):
                pass
        assert json.loads(lock.read_text()) == mine  # the refused run took nothing away
    assert not lock.exists()
    assert not (tmp_path / "results").exists()  # a folder made only for the lock goes with it


def test_the_lock_of_a_process_that_ended_on_this_host_is_taken_over(tmp_path, capsys):
    target = tmp_path / "WGAN_t"
    gone = dead_pid()
    lock_path(target).write_text(json.dumps({"pid": gone, "host": socket.gethostname(), "started": "earlier"}))
    with owned(target, "GAN trial 't'") as mine:
        assert mine["pid"] == os.getpid()
    assert f"taking over the lock {lock_path(target)} of process {gone}" in capsys.readouterr().out


def test_a_live_process_on_another_host_keeps_its_lock_unless_it_is_this_requeued_slurm_job(tmp_path, monkeypatch):
    target = tmp_path / "WGAN_t"
    other = {"pid": 1, "host": "node-17", "started": "earlier", "slurm_job": "4242_3"}
    lock_path(target).write_text(json.dumps(other))
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "999")
    with pytest.raises(PipelineError, match="in use by process 1 on host node-17"):
        with owned(target, "GAN trial 't'"):
            pass
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")  # the same array task in the same run: a live sibling
    with pytest.raises(PipelineError, match="in use by process 1 on host node-17"):
        with owned(target, "GAN trial 't'"):
            pass
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the same array task, requeued onto this node
    with owned(target, "GAN trial 't'") as mine:
        assert mine["slurm_job"] == "4242_3" and mine["slurm_restarts"] == 1


def test_a_stale_lock_taken_over_meanwhile_by_another_run_is_left_to_that_run(tmp_path):
    """Two runs that read the same stale lock: the second must not remove the lock the first has just taken."""
    from utils.locks import remove_if_still

    lock = lock_path(tmp_path / "WGAN_t")
    stale = {"pid": dead_pid(), "host": socket.gethostname(), "started": "earlier"}
    newer = {"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}
    lock.write_text(json.dumps(newer))  # the first run took it over after both had read `stale`
    assert not remove_if_still(lock, stale)
    assert json.loads(lock.read_text()) == newer and sorted(p.name for p in tmp_path.iterdir()) == [lock.name]
    lock.write_text(json.dumps(stale))
    assert remove_if_still(lock, stale) and not any(tmp_path.iterdir())
