"""The statistics of the membership audit (utils/py) on hand-made scores."""

import numpy as np
import pytest

from utils.membership_stats import (
    N_RANDOM_ASSIGNMENTS,
    auc,
    cluster_auc_ci,
    membership_test,
    patch_level,
    roc_curve,
    tpr_at_fpr,
)


def test_auc_tpr_and_bootstrap_on_hand_made_scores():
    assert auc([3, 4], [1, 2]) == 1.0 and auc([1, 2], [3, 4]) == 0.0
    assert auc([1, 3], [2, 2]) == 0.5 and auc([2], [2]) == 0.5
    assert tpr_at_fpr([5, 4, 3, 0], [3.5, 2, 1, 0.5], 0.25) == 0.75  # threshold 2: one non-member above
    assert tpr_at_fpr([5, 4, 3, 0], [3.5, 2, 1, 0.5], 0.0) == 0.5  # threshold 3.5
    # the interval resamples patients: two member patients, [25..49] and [50..74], two non-members [0..24], [25..49]
    member_groups, non_groups = [np.arange(25, 50), np.arange(50, 75)], [np.arange(25), np.arange(25, 50)]
    value, (low, high) = cluster_auc_ci(member_groups, non_groups, patch_level, seed=0)
    assert value == pytest.approx(1 - (300 + 25 / 2) / 2500)  # 300 pairs below, 25 ties
    # a resample holds whole patients: its AUC is that of one of the 9 pairs of patient multisets, 0.5 at worst
    assert low == pytest.approx(0.5) and high == 1.0
    assert cluster_auc_ci(member_groups[:1], non_groups, patch_level, seed=0)[1] is None
    fpr, tpr = roc_curve(np.array([3.0, 4.0]), np.array([1.0, 2.0]))
    assert fpr.tolist() == [0, 0, 0, 0.5, 1] and tpr.tolist() == [0, 0.5, 1, 1, 1]


def test_the_membership_test_is_exact_over_patient_assignments_and_knows_when_it_cannot_reject():
    test = membership_test(np.array([5.0, 6, 7, 8, 9, 10]), np.array([1.0, 2, 3, 4]), seed=0)
    assert test["exhaustive"] and test["assignments"] == 210 and test["p_value"] == pytest.approx(1 / 210)
    # members ranked 1st, 2nd, 3rd, 4th, 5th and 7th of 10: the top six and this one reach its AUC of 23/24
    test = membership_test(np.array([4.0, 6, 7, 8, 9, 10]), np.array([1.0, 2, 3, 5]), seed=0)
    assert test["p_value"] == pytest.approx(2 / 210)
    two_and_two = membership_test(np.array([3.0, 4]), np.array([1.0, 2]), seed=0)
    assert two_and_two["p_value"] == two_and_two["smallest_attainable_p"] == pytest.approx(1 / 6)
    many = membership_test(np.arange(30.0) + 30, np.arange(30.0), seed=0)  # C(60, 30): sampled
    assert not many["exhaustive"] and many["p_value"] == pytest.approx(1 / (1 + N_RANDOM_ASSIGNMENTS))
    mixed = membership_test(np.arange(0.0, 60, 2), np.arange(1.0, 60, 2), seed=0)  # interleaved: no signal
    assert mixed["p_value"] > 0.3
