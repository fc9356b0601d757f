"""The lr schedule: warm-up + cosine to 10%, and its rule when train.steps changes on resume."""
import math

import pytest

from commtrain.lr_schedule import FLOOR, WarmupCosine


def planned(lr, w, t, s):
    """The schedule as it always was (before it could be retargeted)."""
    if s < w:
        return lr * (s + 1) / w
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - w) / max(1, t - w))))


def test_planned_schedule():
    sch = WarmupCosine(3e-3, 10, 100)
    for s in range(100):
        assert sch(s) == pytest.approx(planned(3e-3, 10, 100, s), rel=1e-12)
    assert sch(99) > sch(100) == pytest.approx(FLOOR * 3e-3)


@pytest.mark.parametrize("new_total", [60, 200, 41])
def test_retarget_continues_from_the_resume_point(new_total):
    sch = WarmupCosine(1.0, 10, 100)
    before = [sch(s) for s in range(40)]
    at_40 = sch(40)
    assert sch.retarget(40, new_total)
    assert [sch(s) for s in range(40)][:10] == before[:10]  # warm-up untouched
    assert sch(40) == pytest.approx(at_40)  # continuous at the resume point
    assert sch(new_total) == pytest.approx(FLOOR)  # the floor at the new end
    rates = [sch(s) for s in range(40, new_total + 1)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))  # decays monotonically, never rises again


def test_retarget_during_warmup_stretches_only_the_cosine():
    sch = WarmupCosine(1.0, 10, 100)
    sch.retarget(5, 200)
    for s in range(200):
        assert sch(s) == pytest.approx(planned(1.0, 10, 200, s))


def test_same_total_is_no_change_and_state_roundtrips():
    sch = WarmupCosine(1.0, 2, 20)
    assert not sch.retarget(7, 20)
    sch.retarget(7, 30)
    other = WarmupCosine(1.0, 2, 99)
    other.load_state_dict(sch.state_dict())
    assert [other(s) for s in range(31)] == [sch(s) for s in range(31)]
