"""Specifications of the learning-rate schedule."""
import pytest

from utils.training.schedule import FINAL_LR_FRACTION, learning_rate_at


def test_warm_up_rises_linearly_to_the_peak():
    rates = [learning_rate_at(step, 100, 1e-3, "constant", warmup_steps=4) for step in range(6)]
    assert rates == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_cosine_falls_from_the_peak_after_warm_up_to_its_final_fraction():
    rates = [learning_rate_at(step, 110, 1.0, "cosine", warmup_steps=10) for step in range(110)]
    assert rates[10] == pytest.approx(1.0)
    assert rates[60] == pytest.approx(FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) / 2)
    assert rates[-1] == pytest.approx(FINAL_LR_FRACTION, abs=1e-3)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))
    # Past the planned length (epochs raised on resume) the rate stays at its floor.
    assert learning_rate_at(500, 110, 1.0, "cosine", 10) == pytest.approx(FINAL_LR_FRACTION)


def test_constant_without_warm_up_is_the_papers_fixed_rate():
    assert {learning_rate_at(step, 10, 1e-4) for step in range(10)} == {1e-4}


def test_an_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="lr_schedule"):
        learning_rate_at(0, 10, 1e-3, "linear")
