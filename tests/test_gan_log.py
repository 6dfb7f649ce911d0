"""A GAN run's log (utils/gan_log.py): log.csv as the synthesis, the release and the sweep read it back."""

import math

import pytest

from utils import gan_log
from utils.common import PipelineError


def log_row(epoch, epsilon):
    return {**dict.fromkeys(gan_log.LOG_COLUMNS, 0.25), "epoch": epoch, "steps": 8 * (epoch + 1), "epsilon": epsilon,
            "epsilon_valid": epsilon}


def test_the_log_reads_back_as_numbers_with_inf_for_a_non_private_run(tmp_path):
    path = tmp_path / "log.csv"
    rows = [log_row(0, 1.5), log_row(1, math.inf)]
    gan_log.write_log(path, rows)
    back = gan_log.read_log(path)
    assert back == rows and all(isinstance(r["epoch"], int) and isinstance(r["steps"], int) for r in back)
    assert path.read_text().splitlines()[0] == ",".join(gan_log.LOG_COLUMNS)
    assert gan_log.read_log(tmp_path / "none.csv") == []  # a trial without an epoch yet


def test_a_log_with_a_value_that_is_not_a_number_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "log.csv"
    gan_log.write_log(path, [log_row(0, 1.5)])
    path.write_text(path.read_text().replace("1.5", "lots"))
    with pytest.raises(PipelineError, match=f"GAN log {path} has a value that is not a number"):
        gan_log.read_log(path)
