"""Tests run on the tiny preset, on one thread; each test that writes gets its own DATA_DIR and WORK_DIR. Outputs
that several tests read (phantoms, trained tiny GANs) are made once into a shared folder (shared_folder); a test
that changes them works on its own copy (copy_shared)."""

import os
import shutil
import sys
from pathlib import Path

os.environ["DPGAN_PRESET"] = "tiny"
os.environ.setdefault("MPLBACKEND", "Agg")
# The test machine's cores are shared: threads beyond one only spin. Set before torch is imported (here and in the
# scripts the tests run as subprocesses, which inherit the environment).
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

import config  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """Point config.DATA_DIR / WORK_DIR at fresh folders; returns (data_dir, work_dir, env for subprocesses)."""
    data, work = tmp_path / "data", tmp_path / "work"
    monkeypatch.setattr(config, "DATA_DIR", data)
    monkeypatch.setattr(config, "WORK_DIR", work)
    env = dict(os.environ, DPGAN_PRESET="tiny", DPGAN_DATA_DIR=str(data), DPGAN_WORK_DIR=str(work))
    return data, work, env


@pytest.fixture(scope="session")
def shared_folder(tmp_path_factory):
    """shared_folder(name, build): runs build() with config.DATA_DIR / WORK_DIR at <new folder>/data and /work, set
    and restored here (the monkeypatch fixture is per test); returns (that folder, build's result). Called from a
    module- or session-scoped fixture, so that it runs before the requesting test's own patches."""
    def build_once(name, build):
        root = tmp_path_factory.mktemp(name)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(config, "DATA_DIR", root / "data")
            patch.setattr(config, "WORK_DIR", root / "work")
            return root, build()
    return build_once


@pytest.fixture
def copy_shared(dirs):
    """copy_shared(root): this test's own copy of a shared folder's data and work, in its DATA_DIR and WORK_DIR
    (copying is far cheaper than making them again); returns dirs."""
    def copy(root):
        for name, own in (("data", dirs[0]), ("work", dirs[1])):
            if (root / name).exists():
                shutil.copytree(root / name, own, dirs_exist_ok=True)
        return dirs
    return copy


@pytest.fixture(scope="session")
def phantom_folder(shared_folder):
    """The tiny preset's phantoms of every split and the training patches cut from them, made once."""
    import extract_patches
    import make_phantoms

    def build():
        make_phantoms.main([])
        extract_patches.main(["--split", "train"])

    return shared_folder("phantoms", build)[0]


@pytest.fixture
def phantom_dirs(phantom_folder, copy_shared):
    """This test's own copy of the phantoms and their training patches; returns dirs."""
    return copy_shared(phantom_folder)
