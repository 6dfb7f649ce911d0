"""A GAN run's checkpoints (utils/gan_checkpoints.py): which epochs a trial has, and reading one safely. What
run_gan.py does with them (--resume, its repairs, --init_from): tests/test_gan.py."""

import pytest
import torch

from utils import gan_checkpoints
from utils.common import PipelineError, gan_model_dir


class Foreign:
    """An object a checkpoint of run_gan.py never holds."""


def test_a_trials_epochs_are_its_checkpoints_in_numeric_order_and_nothing_else(dirs):
    folder = gan_model_dir("t")
    folder.mkdir(parents=True)
    for name in ("epoch_10.pth", "epoch_9.pth", "epoch_0.pth", ".epoch_11.pth.k2j_x9a0.pth", "epoch_1.pth.tmp",
                 "notes.txt"):
        (folder / name).write_bytes(b"")
    assert gan_checkpoints.checkpoint_epochs("t") == [0, 9, 10]
    assert gan_checkpoints.checkpoint_epochs("none") == []


@pytest.mark.parametrize("content", ["foreign", "damaged"])
def test_a_foreign_or_damaged_checkpoint_is_refused_naming_the_file(tmp_path, content):
    """Checkpoints load with weights_only: an object other than tensors and containers is refused, not run."""
    path = tmp_path / "epoch_0.pth"
    if content == "foreign":
        torch.save({"generator": Foreign()}, path)
    else:
        path.write_bytes(b"half a checkpoint")
    with pytest.raises(PipelineError, match=f"checkpoint {path} cannot be read"):
        gan_checkpoints.load_checkpoint(path)
    torch.save({"generator": {"weight": torch.ones(2)}, "epoch": 0}, path)
    assert torch.equal(gan_checkpoints.load_checkpoint(path)["generator"]["weight"], torch.ones(2))
