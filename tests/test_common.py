"""utils/common.py: the file helpers every script relies on for safe writes and clear read errors."""

import math

import numpy as np
import pytest

from utils.common import PipelineError, load_json, load_npz, minmax_scale, refuse_existing, save_json, save_npz


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
