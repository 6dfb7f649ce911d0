"""A GAN run's log (utils/gan_log.py): log.csv as the synthesis, the release and the sweep read it back."""

import math

import pytest

from utils import gan_log
from utils.common import PipelineError


def log_row(epoch, epsilon):
    return {**dict.fromkeys(gan_log.LOG_COLUMNS, 0.25), "epoch": epoch, "steps": 8 * (epoch + 1), "epsilon": epsilon,
            "epsilon_valid": epsilon, "generator_updates": 4 * (epoch + 1), "n_discr": 2}


def test_the_log_reads_back_as_numbers_with_inf_for_a_non_private_run(tmp_path):
    path = tmp_path / "log.csv"
    rows = [log_row(0, 1.5), log_row(1, math.inf)]
    gan_log.write_log(path, rows)
    back = gan_log.read_log(path)
    assert back == rows and all(isinstance(r[k], int) for r in back for k in gan_log.COUNT_COLUMNS)
    assert path.read_text().splitlines()[0] == ",".join(gan_log.LOG_COLUMNS)
    assert gan_log.read_log(tmp_path / "none.csv") == []  # a trial without an epoch yet


def test_a_log_with_a_value_that_is_not_a_number_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "log.csv"
    gan_log.write_log(path, [log_row(0, 1.5)])
    path.write_text(path.read_text().replace("1.5", "lots"))
    with pytest.raises(PipelineError, match=f"GAN log {path} has a value that is not a number"):
        gan_log.read_log(path)


def test_a_log_of_an_earlier_version_without_the_newer_columns_reads_them_as_nan(tmp_path):
    path = tmp_path / "log.csv"
    gan_log.write_log(path, [log_row(0, 1.5)])
    lines = [line.split(",") for line in path.read_text().splitlines()]
    keep = [i for i, name in enumerate(lines[0]) if name not in ("generator_updates", "n_discr")]
    path.write_text("\n".join(",".join(line[i] for i in keep) for line in lines) + "\n")
    back = gan_log.read_log(path)[0]
    assert back["steps"] == 8 and math.isnan(back["generator_updates"]) and math.isnan(back["n_discr"])
