"""utils/common.py: the file helpers every script relies on for safe writes and clear read errors."""

import errno
import math
import os

import numpy as np
import pytest

from utils.common import (
    PipelineError,
    atomic_write,
    check_writable,
    load_json,
    load_npz,
    minmax_scale,
    refuse_existing,
    remove_partial_files,
    save_json,
    save_npz,
    save_torch,
)


def test_json_round_trip_keeps_infinity_and_leaves_no_temporary_file(tmp_path):
    path = save_json(tmp_path / "sub" / "a.json", {"epsilon": math.inf, "x": np.float32(0.5), "p": tmp_path})
    assert load_json(path) == {"epsilon": math.inf, "x": 0.5, "p": str(tmp_path)}
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]


def test_load_json_names_the_file_when_missing_or_broken(tmp_path):
    with pytest.raises(PipelineError, match=r"result file .*missing.json does not exist \(run it\)"):
        load_json(tmp_path / "missing.json", "result file", " (run it)")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(PipelineError, match=r"broken.json is not valid JSON"):
        load_json(broken)


def test_load_npz_checks_keys_and_readability(tmp_path):
    path = save_npz(tmp_path / "a.npz", img=np.zeros((2, 3)), label=np.ones((2, 3), np.uint8))
    assert load_npz(path, ("img", "label"))["label"].sum() == 6
    with pytest.raises(PipelineError, match=r"lacks the arrays \['patient'\]"):
        load_npz(path, ("img", "patient"), "patches file")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(PipelineError, match="cannot be read as an npz file"):
        load_npz(tmp_path / "bad.npz", ("img",))


def test_refuse_existing_never_touches_the_file(tmp_path):
    path = tmp_path / "out.txt"
    refuse_existing(path)  # nothing there: fine
    path.write_text("keep")
    with pytest.raises(PipelineError, match="--overwrite"):
        refuse_existing(path)
    assert path.read_text() == "keep"


def test_minmax_scale_per_patch():
    x = np.stack([np.arange(4.0).reshape(2, 2), np.full((2, 2), 3.0)])
    out = minmax_scale(x, -1, 1)
    np.testing.assert_allclose(out[0], [[-1, -1 / 3], [1 / 3, 1]], atol=1e-6)
    assert (out[1] == -1).all()  # a flat patch becomes `low`, without dividing by zero


def test_a_full_disk_or_read_only_folder_is_one_line_naming_the_file_and_keeps_the_old_one(tmp_path):
    path = save_json(tmp_path / "a.json", {"old": 1})

    def fail(errno_):
        def write(tmp):
            open(tmp, "w").write("half")
            raise OSError(errno_, os.strerror(errno_), tmp)
        return write

    for errno_, reason in ((errno.ENOSPC, "no space left on the disk"), (errno.EROFS, "the file system is read-only")):
        with pytest.raises(PipelineError, match=rf"cannot write the file {path}: {reason}"):
            atomic_write(path, fail(errno_))
        assert load_json(path) == {"old": 1} and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_full_disk_inside_torch_save_is_a_write_failure_not_torchs_runtime_error(tmp_path, monkeypatch):
    import torch

    def torch_save(obj, f):  # what torch does: the file's OSError becomes the context of its own RuntimeError
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534") from None

    monkeypatch.setattr(torch, "save", torch_save)
    with pytest.raises(PipelineError, match=r"cannot write the file .*epoch_1.pth: no space left on the disk"):
        save_torch(tmp_path / "epoch_1.pth", {})
    assert list(tmp_path.iterdir()) == []


def test_partial_files_of_a_killed_write_are_recognised_and_nothing_else(tmp_path):
    for name in (".epoch_1.pth.k2j_x9a0.pth", ".log.csv.abcdefgh.csv", "epoch_0.pth", "log.csv", ".WGAN_t.lock"):
        (tmp_path / name).write_text("x")
    assert remove_partial_files(tmp_path) == [".epoch_1.pth.k2j_x9a0.pth", ".log.csv.abcdefgh.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".WGAN_t.lock", "epoch_0.pth", "log.csv"]


def test_check_writable_refuses_a_folder_without_room_before_anything_is_computed(tmp_path):
    check_writable(tmp_path / "new", "checkpoints", need_bytes=1)
    with pytest.raises(PipelineError, match=r"the checkpoints need about .* MB in .*new, which has .* MB free"):
        check_writable(tmp_path / "new", "checkpoints", need_bytes=1 << 62)
