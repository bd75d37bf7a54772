"""LR schedules: pure functions of the step (so a resumed run gets the same rate)."""
import math

import pytest

from models.lr import LR_SCHEDULES, warmup_constant, warmup_cosine


def test_warmup_cosine_golden_values():
    assert warmup_cosine(0, 1.0, 10, 110) == 0.0
    assert warmup_cosine(5, 1.0, 10, 110) == pytest.approx(0.5)
    assert warmup_cosine(10, 1.0, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(60, 1.0, 10, 110) == pytest.approx(0.5)           # half way: cos(pi/2)
    assert warmup_cosine(110, 1.0, 10, 110) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(500, 1.0, 10, 110) == pytest.approx(0.0, abs=1e-12)  # clamps after the end
    assert warmup_cosine(110, 2.0, 0, 110, final_ratio=0.1) == pytest.approx(0.2)
    assert warmup_cosine(35, 1.0, 10, 110) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


def test_warmup_constant_and_registry():
    assert warmup_constant(0, 3.0, 0, 100) == 3.0
    assert warmup_constant(2, 3.0, 4, 100) == pytest.approx(1.5)
    assert warmup_constant(99, 3.0, 4, 100) == 3.0
    assert set(LR_SCHEDULES) == {"constant", "cosine"}


def test_schedule_is_monotone_after_warmup():
    lrs = [warmup_cosine(s, 1e-3, 20, 200) for s in range(20, 201)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
