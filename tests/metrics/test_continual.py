"""Continual-learning summaries on hand-computed matrices."""

from __future__ import annotations

import numpy as np
import pytest

from ccnf.metrics import (
    backward_transfer,
    final_average,
    forgetting,
    per_task_forgetting,
    step_average,
)

nan = np.nan

# R[t, j]: metric on task j after training task t.
R3 = np.array(
    [
        [0.90, nan, nan],
        [0.80, 0.95, nan],
        [0.70, 0.97, 0.85],
    ]
)


def test_final_average() -> None:
    assert final_average(R3) == pytest.approx((0.70 + 0.97 + 0.85) / 3)


def test_forgetting_with_negative_entry() -> None:
    # task 0: best of R[0,0], R[1,0] = 0.90, final 0.70 -> 0.20
    # task 1: best of R[1,1] = 0.95, final 0.97 -> -0.02 (backward transfer)
    np.testing.assert_allclose(per_task_forgetting(R3), [0.20, -0.02], atol=1e-12)
    assert forgetting(R3) == pytest.approx(0.09)


def test_forgetting_uses_the_best_earlier_value_not_the_first() -> None:
    R = np.array(
        [
            [0.6, nan, nan, nan],
            [0.9, 0.8, nan, nan],
            [0.7, 0.8, 0.5, nan],
            [0.5, 0.9, 0.4, 1.0],
        ]
    )
    # task 0: max(0.6, 0.9, 0.7) - 0.5 = 0.4; task 1: max(0.8, 0.8) - 0.9 = -0.1;
    # task 2: 0.5 - 0.4 = 0.1. The last task (final 1.0) is excluded.
    np.testing.assert_allclose(per_task_forgetting(R), [0.4, -0.1, 0.1], atol=1e-12)
    assert forgetting(R) == pytest.approx(0.4 / 3)
    assert final_average(R) == pytest.approx(0.7)


def test_upper_triangle_is_ignored() -> None:
    R = R3.copy()
    R[0, 1:] = [123.0, -5.0]
    R[1, 2] = np.inf
    assert forgetting(R) == pytest.approx(forgetting(R3))
    assert final_average(R) == pytest.approx(final_average(R3))


def test_single_task() -> None:
    R = np.array([[0.8]])
    assert final_average(R) == pytest.approx(0.8)
    assert forgetting(R) == 0.0
    assert per_task_forgetting(R).shape == (0,)


@pytest.mark.parametrize(
    "R",
    [
        np.zeros((2, 3)),
        np.zeros(3),
        np.zeros((0, 0)),
        np.array([[0.9, nan], [nan, 0.8]]),  # missing R[1, 0]
        np.array([[nan, nan], [0.7, 0.8]]),  # missing diagonal
        np.array([[0.9, nan], [np.inf, 0.8]]),
    ],
)
@pytest.mark.parametrize("fn", [final_average, forgetting, per_task_forgetting])
def test_invalid_input_raises(fn, R: np.ndarray) -> None:
    with pytest.raises(ValueError, match="R"):
        fn(R)


def test_diagonal_average_is_each_task_right_after_it_was_learned() -> None:
    from ccnf.metrics import diagonal_average

    R = np.array([[0.9, nan, nan], [0.7, 0.8, nan], [0.6, 0.5, 0.95]])
    assert diagonal_average(R) == pytest.approx((0.9 + 0.8 + 0.95) / 3)
    assert diagonal_average(np.array([[0.4]])) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="R"):
        diagonal_average(np.array([[nan, nan], [0.7, 0.8]]))


def test_step_average_is_the_mean_over_steps_of_the_seen_task_average() -> None:
    # step 0: 0.90; step 1: (0.80 + 0.95) / 2 = 0.875; step 2: (0.70 + 0.97 + 0.85) / 3 = 0.84
    assert step_average(R3) == pytest.approx((0.90 + 0.875 + 0.84) / 3)
    # it counts the early steps, so it is not the after-last-task figure the study reports
    assert step_average(R3) != pytest.approx(final_average(R3))
    assert step_average(np.array([[0.6]])) == pytest.approx(0.6)


def test_backward_transfer_against_the_diagonal() -> None:
    # task 0: 0.70 - 0.90 = -0.20; task 1: 0.97 - 0.95 = +0.02
    assert backward_transfer(R3) == pytest.approx((-0.20 + 0.02) / 2)
    assert backward_transfer(np.array([[0.6]])) == 0.0
    # unlike forgetting it compares with the value right after learning, not the best one:
    # task 0 rose to 0.9 then fell to 0.7 -> transfer +0.2 but forgetting 0.2
    r = np.array([[0.5, nan, nan], [0.9, 0.8, nan], [0.7, 0.8, 0.6]])
    assert backward_transfer(r) == pytest.approx(0.1) and forgetting(r) == pytest.approx(0.1)
    assert per_task_forgetting(r)[0] == pytest.approx(0.2)
