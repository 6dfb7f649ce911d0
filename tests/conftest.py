"""Tests run on the tiny preset; each test that writes gets its own DATA_DIR and WORK_DIR."""

import os
import sys
from pathlib import Path

os.environ["DPGAN_PRESET"] = "tiny"
os.environ.setdefault("MPLBACKEND", "Agg")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

import config  # noqa: E402


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """Point config.DATA_DIR / WORK_DIR at fresh folders; returns (data_dir, work_dir, env for subprocesses)."""
    data, work = tmp_path / "data", tmp_path / "work"
    monkeypatch.setattr(config, "DATA_DIR", data)
    monkeypatch.setattr(config, "WORK_DIR", work)
    env = dict(os.environ, DPGAN_PRESET="tiny", DPGAN_DATA_DIR=str(data), DPGAN_WORK_DIR=str(work))
    return data, work, env
