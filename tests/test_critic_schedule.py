"""Bie et al.'s adaptive critic steps (utils/critic_schedule.py): when n_D climbs, and what it never changes."""

import pytest
import torch

from utils.critic_schedule import LADDER, AdaptiveCriticSteps

FOOLED = torch.ones(8)  # every generated sample scored as real: the critic's accuracy on them is 0
CAUGHT = -torch.ones(8)  # every one scored as fake: accuracy 1


def test_n_d_climbs_one_rung_when_the_smoothed_accuracy_falls_to_the_threshold_after_the_grace():
    schedule = AdaptiveCriticSteps(start=1, threshold=0.6, grace=3)
    schedule.observe(FOOLED)  # the first value starts the average: 0, below the threshold, but within the grace
    schedule.observe(FOOLED)
    assert schedule.n_discr == 1
    schedule.observe(FOOLED)
    assert schedule.n_discr == 2 and schedule.since_change == 0
    for _ in range(2):
        schedule.observe(FOOLED)
    assert schedule.n_discr == 2  # a new grace after every change
    schedule.observe(FOOLED)
    assert schedule.n_discr == 5


def test_a_critic_that_tells_generated_samples_apart_keeps_its_n_d():
    schedule = AdaptiveCriticSteps(start=5, threshold=0.6, grace=1)
    for _ in range(50):
        schedule.observe(CAUGHT)
    assert schedule.n_discr == 5 and schedule.accuracy_ema == 1.0


def test_the_average_is_smoothed_so_one_bad_step_does_not_move_n_d():
    schedule = AdaptiveCriticSteps(start=1, threshold=0.6, grace=1)
    schedule.observe(CAUGHT)
    schedule.observe(FOOLED)
    assert schedule.accuracy_ema == pytest.approx(0.99) and schedule.n_discr == 1


def test_n_d_never_passes_the_top_of_the_ladder_and_the_state_round_trips():
    schedule = AdaptiveCriticSteps(start=LADDER[-2], threshold=0.6, grace=1)
    for _ in range(5):
        schedule.observe(FOOLED)
    assert schedule.n_discr == LADDER[-1]
    copy = AdaptiveCriticSteps(start=1, threshold=0.6, grace=1)
    copy.load_state_dict(schedule.state_dict())
    assert (copy.n_discr, copy.accuracy_ema, copy.since_change) == (LADDER[-1], 0.0, schedule.since_change)


@pytest.mark.parametrize("kwargs, flag", [(dict(start=3, threshold=0.6, grace=1), "--n_discr 3"),
                                          (dict(start=1, threshold=1.0, grace=1), "--adaptive_critic 1.0"),
                                          (dict(start=1, threshold=0.6, grace=0), "--adaptive_grace 0")])
def test_bad_settings_are_refused_naming_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        AdaptiveCriticSteps(**kwargs)

